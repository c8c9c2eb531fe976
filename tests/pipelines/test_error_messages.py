"""What the user reads: every option our messages suggest exists."""

import argparse
import ast
import re
from pathlib import Path

from pipelines import cli

ROOT = Path(__file__).resolve().parents[2]
#: ``--name`` not inside a longer word (``data--x``) and not ``---``.
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _message_texts(path: Path) -> list[tuple[int, str]]:
    """(line, literal text) of every string in a ``raise`` or a ``note(...)`` call, f-string parts included."""
    texts = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Raise) and node.exc is not None:
            message = node.exc
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "note":
            message = node
        else:
            continue
        for part in ast.walk(message):
            if isinstance(part, ast.Constant) and isinstance(part.value, str):
                texts.append((node.lineno, part.value))
    return texts


def _known_options() -> set[str]:
    """Every option of ``moco`` and of its commands, at any depth (``moco tune momentum --metric``)."""
    known: set[str] = set()
    pending = [cli.build_parser()]
    while pending:
        parser = pending.pop()
        for action in parser._actions:
            known.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                pending.extend(action.choices.values())
    return known


def test_every_option_a_message_suggests_exists():
    known = _known_options()
    suggested = {
        (f"{path.relative_to(ROOT)}:{line}", option)
        for path in sorted((ROOT / "pipelines").rglob("*.py"))
        for line, text in _message_texts(path)
        for option in OPTION.findall(text)
    }
    assert len(suggested) > 20 and {"--resume", "--set", "--output"} <= {option for _, option in suggested}
    assert sorted((where, option) for where, option in suggested if option not in known) == []


def test_the_scan_finds_a_wrong_suggestion(tmp_path):
    source = tmp_path / "example.py"
    source.write_text('def f(x):\n    raise ValueError(f"bad {x}; give it with --layout=folder")\n')
    assert [option for _, text in _message_texts(source) for option in OPTION.findall(text)] == ["--layout"]
    assert "--layout" not in _known_options()
