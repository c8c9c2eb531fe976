"""Layering: the product (``pipelines``) never imports its benchmarks."""

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = ROOT / "pipelines"

_IMPORT_EVERYTHING = """
import importlib, json, pkgutil, sys
import pipelines
names = sorted(m.name for m in pkgutil.walk_packages(pipelines.__path__, "pipelines."))
for name in names:
    importlib.import_module(name)
print(json.dumps({"imported": names, "benchmarks": sorted(m for m in sys.modules if m.split(".")[0] == "benchmarks")}))
"""


def test_importing_every_pipelines_module_does_not_import_benchmarks():
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_EVERYTHING], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert {"pipelines.cli", "pipelines.pretrain.worker", "pipelines.demo"} <= set(report["imported"])
    assert report["benchmarks"] == []


def _imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


def test_no_pipelines_source_imports_benchmarks_even_lazily():
    # Imports inside functions run only on some paths; the source says what they would load.
    sources = sorted(PIPELINES.rglob("*.py"))
    assert len(sources) > 10
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in _imported_modules(path) if m.split(".")[0] == "benchmarks")
        for path in sources
    }
    assert {path: modules for path, modules in offenders.items() if modules} == {}
