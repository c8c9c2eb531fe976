"""``moco submit``: run any ``moco`` command on a Ray cluster through the Ray Jobs API.

The job carries this project as its runtime environment (the source tree as ``working_dir``, or
the installed packages as ``py_modules``), so the cluster runs the code you have, on the image's
dependencies. ``--storage`` sets ``MOCO_STORAGE`` for the job: commands put their default run
directories there (``s3://``, ``gs://`` or a path every node reads). docs/CLUSTER.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.cli_common import UserError
from pipelines.console import note
from pipelines.filesystems import STORAGE_ENV

#: The packages of this project (pyproject.toml), shipped as py_modules from an installed copy.
PROJECT_PACKAGES = ("benchmarks", "moco_core", "moco_recipes", "pipelines", "tune_spaces")
#: Never uploaded with the source tree (besides what .gitignore excludes).
EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "outputs",
    "mlruns",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
]
#: How the commands' parsers name a value that is a path or URI (``--output DIR``, ``--data URI``,
#: ``--backbone SOURCE``, ``--work-dir`` with its default WORK_DIR): on a cluster a relative path
#: would resolve inside the job's temporary copy of the project, on whichever node runs the driver.
PATH_METAVAR = re.compile(r"DIR|FILE|URI|SOURCE|\w+_(DIR|FILE)")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "submit",
        parents=[common],
        help="run a moco command on a Ray cluster (Ray Jobs API)",
        description="Submit 'moco COMMAND ...' (everything after --) as a Ray job that carries this project, "
        "print its id and follow its logs until it ends; or look at, read or stop a submitted job.",
        epilog="Example: moco submit --address http://HEAD:8265 --storage s3://bucket/runs -- moco pretrain "
        "--recipe in1m-v2 --data s3://bucket/in1k-train --workers 8 --gpus-per-worker 1. Clusters: docs/CLUSTER.md.",
    )
    parser.add_argument(
        "--address",
        metavar="URL",
        help="the cluster's job server, e.g. http://HEAD:8265 (default: $RAY_ADDRESS, else a local cluster)",
    )
    parser.add_argument(
        "--storage",
        metavar="URI",
        help=f"where the job's runs go by default (${STORAGE_ENV}): s3://bucket/prefix, gs://..., or a shared path",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable for the job, e.g. MLFLOW_TRACKING_URI=http://mlflow:5000 (repeatable)",
    )
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return without following")
    actions = parser.add_mutually_exclusive_group()
    actions.add_argument("--status", metavar="ID", help="the status of job ID")
    actions.add_argument("--logs", metavar="ID", help="the logs of job ID so far")
    actions.add_argument("--stop", metavar="ID", help="stop job ID")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- moco COMMAND [OPTIONS]")
    parser.set_defaults(handler=_run)


def _use_local_token() -> None:
    """Send the local Ray token (``~/.ray/auth_token``, ``$RAY_AUTH_TOKEN``) when there is one and
    ``RAY_AUTH_MODE`` is unset, as ``ray start`` and ``ray.init`` do: a cluster started with
    Ray's token authentication (its default when a token exists) refuses requests without it."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _quiet_ray_logs() -> None:
    """Ray's own lines about packaging, uploads and sockets stay off the terminal (``--debug``
    shows them); its loggers that set a level of their own are set one by one."""
    for name in [name for name in logging.root.manager.loggerDict if name == "ray" or name.startswith("ray.")]:
        logger = logging.getLogger(name)
        if name == "ray" or logger.level != logging.NOTSET:
            logger.setLevel(logging.ERROR)


def _client(address: str | None, debug: bool = False) -> Any:
    from ray.job_submission import JobSubmissionClient

    if not debug:
        _quiet_ray_logs()
    _use_local_token()
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, ValueError, RuntimeError) as error:
        where = address or os.environ.get("RAY_ADDRESS") or "a local cluster"
        raise UserError(
            f"cannot reach the Ray job server at {where} ({error}); give --address http://HEAD:8265 "
            "(the head node's dashboard port) or start a cluster (docs/CLUSTER.md)"
        ) from None


def project_runtime_env(storage: str | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """A Ray runtime environment that carries this project to every process of a job.

    From a source tree (a checkout with ``pyproject.toml``) the tree is the ``working_dir``
    (less :data:`EXCLUDES` and what .gitignore lists); from an installed copy, the packages are
    ``py_modules``.
    """
    import pipelines

    root = Path(pipelines.__file__).resolve().parents[1]
    runtime_env: dict[str, Any]
    if (root / "pyproject.toml").is_file():
        runtime_env = {"working_dir": str(root), "excludes": list(EXCLUDES)}
    else:
        import importlib.util

        # Found, not imported: the product does not load its benchmarks (tests/pipelines/test_imports.py).
        specs = [importlib.util.find_spec(name) for name in PROJECT_PACKAGES]
        modules = [location for spec in specs if spec for location in spec.submodule_search_locations or []]
        runtime_env = {"py_modules": modules, "excludes": ["__pycache__"]}
    variables = dict(env or {})
    if storage:
        variables[STORAGE_ENV] = storage
    if variables:
        runtime_env["env_vars"] = variables
    return runtime_env


def _command(arguments: list[str]) -> list[str]:
    """The command after ``--``: a moco command whose path options are absolute paths or URIs."""
    command = arguments[1:] if arguments[:1] == ["--"] else list(arguments)
    if not command:
        raise UserError("give the command to run after --, e.g. moco submit -- moco pretrain --recipe demo ...")
    if Path(command[0]).name != "moco":
        raise UserError(f"the command after -- must be a moco command (moco pretrain ...), got {command[0]!r}")
    relative = _relative_paths(command)
    if relative:
        option, path = relative[0]
        pretrain_output = command[1:2] == ["pretrain"] and option == "--output"
        storage = " (or leave --output out and give moco submit --storage URI)" if pretrain_output else ""
        raise UserError(
            f"{option} {path} is a relative path: on the cluster it would resolve inside the job's temporary copy "
            f"of this project; give an absolute path that every node reads, or a URI (s3://, gs://){storage}"
        )
    return command


def path_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The options of ``parser`` and of its subcommands, at any depth, whose value is a path or URI
    (by :data:`PATH_METAVAR`), each with its action."""
    options: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subcommand in action.choices.values():
                options.update(path_options(subcommand))
        elif action.option_strings and PATH_METAVAR.fullmatch(str(action.metavar or action.dest.upper())):
            options.update(dict.fromkeys(action.option_strings, action))
    return options


def _relative_paths(command: list[str]) -> list[tuple[str, str]]:
    """``(option, path)`` for each relative local path given to a path option of the moco
    ``command``; options are those of the product's parsers (abbreviations resolved as argparse does)."""
    from pipelines.cli import build_parser  # pipelines.cli imports this module

    root = build_parser()
    parser = _subcommand_parser(root, command[1:]) or root  # e.g. moco bench: the product's options by name
    options = path_options(parser)
    relative = []
    for index, word in enumerate(command):
        written, sep, value = word.partition("=")
        option = written if written in options else _abbreviated(parser, written)
        if option not in options:
            continue
        if sep:
            values = [value]
        else:
            following = _option_values(command[index + 1 :])
            values = following if options[option].nargs in ("+", "*") else following[:1]
        relative += [
            (option, path) for path in values if "://" not in path and not os.path.isabs(os.path.expanduser(path))
        ]
    return relative


def _subcommand_parser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser | None:
    """The parser of the (sub)command that ``words`` name (``tune momentum --data ...``); None if unknown."""
    for word in words:
        subcommands = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
        if not subcommands:
            break
        if word not in subcommands[0].choices:
            return None
        parser = subcommands[0].choices[word]
    return parser


def _abbreviated(parser: argparse.ArgumentParser, word: str) -> str | None:
    """The long option of ``parser`` that ``word`` abbreviates (a unique prefix, as argparse accepts)."""
    matches = [option for option in parser._option_string_actions if word.startswith("--") and option.startswith(word)]
    return matches[0] if len(matches) == 1 else None


def _option_values(rest: list[str]) -> list[str]:
    values = []
    for word in rest:
        if word.startswith("-"):
            break
        values.append(word)
    return values


def _parse_env(pairs: list[str]) -> dict[str, str]:
    variables = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--env {pair!r} is not of the form KEY=VALUE")
        variables[key] = value
    return variables


def _status(client: Any, job_id: str) -> dict[str, Any]:
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as error:
        reason = str(error).splitlines()[0]
        raise UserError(f"no job {job_id} on this cluster ({reason}); list them with 'ray job list'") from None
    return {
        "job_id": job_id,
        "status": str(getattr(info.status, "value", info.status)),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "driver_exit_code": getattr(info, "driver_exit_code", None),
    }


def _wait_until_terminal(client: Any, job_id: str, timeout: float | None = None) -> dict[str, Any]:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = _status(client, job_id)
        if status["status"] in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(0.5)


def _follow(client: Any, job_id: str) -> None:
    """Copy the job's logs to stderr as they come, until the job ends."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stderr.write(lines)
            sys.stderr.flush()

    asyncio.run(tail())


def _finished(status: dict[str, Any], address: str) -> dict[str, Any]:
    if status["status"] != "SUCCEEDED":
        raise UserError(
            f"job {status['job_id']} {status['status']}: {status['message']} "
            f"(its logs: moco submit --address {address} --logs {status['job_id']})"
        )
    return status


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from ray.exceptions import AuthenticationError

    try:
        return _act(args)
    except AuthenticationError:
        raise UserError(
            "the job server refused the request: the cluster uses Ray's token authentication; put its token "
            "in ~/.ray/auth_token or $RAY_AUTH_TOKEN ('ray get-auth-token' on the head prints it)"
        ) from None


def _act(args: argparse.Namespace) -> dict[str, Any]:
    job_id = args.status or args.logs or args.stop
    command = [word for word in args.command if word != "--"] if job_id else _command(args.command)
    if job_id and command:
        raise UserError("--status, --logs and --stop take a job id, not a command")
    client = _client(args.address, args.debug)
    address = client.get_address()
    if args.status:
        return _status(client, args.status)
    if args.logs:
        status = _status(client, args.logs)
        logs = client.get_job_logs(args.logs)
        if args.json:
            return {**status, "logs": logs}
        sys.stdout.write(logs)
        return status
    if args.stop:
        _status(client, args.stop)  # an unknown id is one clear line
        client.stop_job(args.stop)
        return _wait_until_terminal(client, args.stop, timeout=60)

    entrypoint = shlex.join(command)
    runtime_env = project_runtime_env(args.storage, _parse_env(args.env))
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    note(f"submitted job {job_id} to {address}: {entrypoint}")
    note(f"(moco submit --address {address} --status|--logs|--stop {job_id})")
    if args.no_wait:
        return {"job_id": job_id, "status": _status(client, job_id)["status"], "address": address}
    try:
        _follow(client, job_id)
    except KeyboardInterrupt:
        note(f"job {job_id} goes on; stop it with moco submit --address {address} --stop {job_id}")
        raise
    return {**_finished(_wait_until_terminal(client, job_id), address), "address": address}
