"""What the three sweeps share: the sweep directory, the parent MLflow run, the Tuner (fresh, or
restored with ``--resume``), the results table, the best trial and the artifacts.

A sweep directory::

    OUTPUT/sweep.json      kind, inputs (to resume), the trials' points, the parent MLflow run
    OUTPUT/tune/           Ray Tune's experiment (tune-2/, ... for the trials a --resume ran)
    OUTPUT/tune.log        Tune's own console output
    OUTPUT/trials/<name>/  a pretraining trial's run directory and probe features
    OUTPUT/results.csv     one row per trial (also results.md)
    OUTPUT/best.json       the best trial's row
    OUTPUT/<plot>.png      the sweep's figure
    OUTPUT/summary.json    the returned summary
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.cli_common import Interrupted
from pipelines.config import ConfigError
from pipelines.console import note
from pipelines.pretrain.tracking import Tracker, default_tracking_uri, ui_command
from tune_spaces.common import Point, trial_name

SWEEP_FILE = "sweep.json"
TUNE_DIR = "tune"
TUNE_LOG = "tune.log"
TRIALS_DIR = "trials"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
BEST_FILE = "best.json"
SUMMARY = "summary.json"
EXPERIMENT = "moco-tune"
#: Row statuses: finished; diverged, oscillated or collapsed (the paper's "fail"); raised; stopped early
#: by ASHA; not run because it does not fit (end-to-end batches); not run yet (interrupted).
STATUSES = ("ok", "fail", "error", "stopped", "skipped", "pending")


@dataclass(frozen=True)
class SweepState:
    """A sweep being run: its directory, its trials and its parent MLflow run.

    Attributes:
        kind: ``probe``, ``momentum`` or ``mechanism``.
        output: the sweep directory (an absolute local path).
        points: the trials, in table order.
        inputs: what ``--resume`` needs to rebuild the sweep (JSON).
        parent_run_id: the parent MLflow run (None when MLflow is off or down).
        tracking_uri: where MLflow runs go.
        tracking_enabled: MLflow on.
        resumed: this call continues an earlier one.
        trial_runs: MLflow runs already logged by the driver for trials (probe sweeps), by trial name.
    """

    kind: str
    output: str
    points: tuple[Point, ...]
    inputs: dict[str, Any]
    parent_run_id: str | None
    tracking_uri: str
    tracking_enabled: bool
    resumed: bool
    trial_runs: dict[str, str]

    @property
    def path(self) -> Path:
        return Path(self.output)

    def trial_dir(self, point: Point) -> Path:
        return self.path / TRIALS_DIR / trial_name(point)

    def parent_tracker(self) -> Tracker:
        tracker = Tracker(self.tracking_uri, self.tracking_enabled)
        tracker.attach(self.parent_run_id)
        return tracker

    def save(self) -> None:
        record = {
            "kind": self.kind,
            "inputs": self.inputs,
            "points": list(self.points),
            "parent_run_id": self.parent_run_id,
            "tracking_uri": self.tracking_uri,
            "tracking_enabled": self.tracking_enabled,
            "trial_runs": self.trial_runs,
        }
        (self.path / SWEEP_FILE).write_text(json.dumps(record, indent=2, default=str))


def local_output(output: str) -> str:
    """Sweeps write local directories (Tune's experiment, tables, plots); URIs are refused."""
    if "://" in output:
        raise ConfigError(f"--output {output}: a sweep directory must be a local path (trials may still read URIs)")
    return str(Path(output).resolve())


def read_sweep(output: str) -> dict[str, Any]:
    """The ``sweep.json`` of a sweep directory.

    Raises:
        ConfigError: ``output`` holds no sweep.
    """
    path = Path(local_output(output)) / SWEEP_FILE
    if not path.is_file():
        raise ConfigError(f"{output} holds no sweep to resume (no {SWEEP_FILE})")
    return json.loads(path.read_text())


def check_output(output: str, resume: bool) -> str:
    """The sweep directory as a local absolute path: one holding a sweep to resume, or one holding
    none for a new sweep (checked before Ray starts).

    Raises:
        ConfigError: a URI, a resume of a directory holding no sweep, a new sweep in one that holds one.
    """
    output = local_output(output)
    if resume:
        read_sweep(output)
    elif (Path(output) / SWEEP_FILE).exists():
        raise ConfigError(f"{output} already holds a sweep; continue it with --resume {output} or give a new --output")
    return output


def start_sweep(
    kind: str,
    output: str,
    points: Sequence[Point],
    inputs: dict[str, Any],
    params: dict[str, Any],
    tracking_uri: str | None,
    tracking_enabled: bool,
    resume: bool,
) -> SweepState:
    """Create (or, with ``resume``, reopen) the sweep directory and its parent MLflow run.

    Raises:
        ConfigError: a new sweep in a directory holding one, or a resume of another kind of sweep.
    """
    output = check_output(output, resume)
    path = Path(output)
    if resume:
        record = read_sweep(output)
        if record["kind"] != kind:
            raise ConfigError(f"{output} holds a {record['kind']} sweep, not a {kind} sweep")
        state = SweepState(
            kind,
            output,
            tuple(record["points"]),
            record["inputs"],
            record["parent_run_id"],
            record["tracking_uri"],
            record["tracking_enabled"],
            True,
            dict(record.get("trial_runs", {})),
        )
        note(f"tune {kind}: resuming the sweep in {output} ({len(state.points)} trials)")
        return state
    path.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or default_tracking_uri()
    parent = Tracker(uri, tracking_enabled)
    parent.start(EXPERIMENT, f"tune-{kind}", None)
    parent.log_params({"sweep": kind, "trials": len(points), **params})
    state = SweepState(kind, output, tuple(points), inputs, parent.run_id, uri, parent.enabled, False, {})
    state.save()
    return state


def _stop_after_trials(count: int) -> Any:
    """Testing aid: a Tune stopper that ends the experiment once ``count`` trials have finished,
    as an interruption would."""
    from ray.tune import Stopper

    class StopAfterTrials(Stopper):
        def __init__(self) -> None:
            self.finished: set[str] = set()

        def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
            if result.get("finished"):
                self.finished.add(trial_id)
            return False

        def stop_all(self) -> bool:
            return len(self.finished) >= count

    return StopAfterTrials()


@contextlib.contextmanager
def parent_marked_failed_on_error(state: SweepState) -> Iterator[None]:
    """A sweep that raises leaves its parent MLflow run FAILED (KILLED when interrupted), not RUNNING."""
    try:
        yield
    except KeyboardInterrupt:
        state.parent_tracker().finish("KILLED")
        raise
    except BaseException:
        state.parent_tracker().finish("FAILED")
        raise


def _trial_dirname(trial: Any) -> str:
    return trial_name(trial.config["trial"])


Outcome = tuple[dict[str, Any] | None, str | None]


def _outcomes(grid: Any) -> dict[str, Outcome]:
    """(last reported metrics, error line) of every trial of a ResultGrid, by trial name."""
    outcome: dict[str, Outcome] = {}
    for result in grid:
        point = (result.config or {}).get("trial")
        if point is not None:
            error = None if result.error is None else _error_line(result.error)
            outcome[trial_name(point)] = (dict(result.metrics or {}) or None, error)
    return outcome


def _done(outcome: Outcome | None, keep_stopped: bool) -> bool:
    """A trial that need not run again: it finished, or (``keep_stopped``: ASHA) it reported and
    was stopped without an error."""
    if outcome is None:
        return False
    metrics, error = outcome
    return bool(metrics) and error is None and (bool(metrics.get("finished")) or keep_stopped)


def run_trials(
    state: SweepState,
    trainable: Callable[[dict[str, Any]], None],
    max_concurrent: int | None,
    scheduler: Any = None,
    stop_after_trials: int = 0,
) -> list[tuple[Point, dict[str, Any] | None, str | None]]:
    """Run the sweep's trials with Ray Tune; (point, last reported metrics, error) per point.

    A resumed sweep reads every earlier Tune experiment of the directory back (``Tuner.restore``)
    and runs only the points none of them finished (errored ones again) in a new experiment
    (``OUTPUT/tune-2``, ...). It does not ``fit`` the restored experiment: Tune marks its search
    finished when a run is interrupted, so a restored grid search never starts the points it had
    not yet generated (the ones ``max_concurrent`` held back). A pretraining trial that was cut
    off continues its run from the run's newest checkpoint.
    """
    from ray import tune

    from tune_spaces.common import param_space

    earlier = sorted(
        (path for path in state.path.glob(f"{TUNE_DIR}*") if path.is_dir() and tune.Tuner.can_restore(str(path))),
        key=lambda path: path.stat().st_mtime,
    )
    outcomes: dict[str, Outcome] = {}
    for path in earlier:
        outcomes.update(_outcomes(tune.Tuner.restore(str(path), trainable=trainable).get_results()))
    keep_stopped = scheduler is not None
    remaining = [point for point in state.points if not _done(outcomes.get(trial_name(point)), keep_stopped)]
    if state.resumed:
        note(f"tune {state.kind}: {len(state.points) - len(remaining)} trial(s) done before, {len(remaining)} to run")
    if remaining:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(remaining),
            tune_config=tune.TuneConfig(
                max_concurrent_trials=max_concurrent,
                scheduler=scheduler,
                trial_dirname_creator=_trial_dirname,
                trial_name_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                storage_path=state.output,
                name=TUNE_DIR if not earlier else f"{TUNE_DIR}-{len(earlier) + 1}",
                verbose=0,
                stop=_stop_after_trials(stop_after_trials) if stop_after_trials else None,
            ),
        )
        # Tune prints its own experiment banner to stdout: it goes to OUTPUT/tune.log, leaving
        # stderr to our progress and stdout to --json's line.
        with open(state.path / TUNE_LOG, "a") as log, contextlib.redirect_stdout(log), _sigint_handler_kept():
            grid = tuner.fit()
        fresh = _outcomes(grid)
        outcomes.update({name: outcome for name, outcome in fresh.items() if outcome != (None, None)})
    return [(point, *outcomes.get(trial_name(point), (None, None))) for point in state.points]


@contextlib.contextmanager
def _sigint_handler_kept() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt again once Tune is done. While it runs, Tune's handler turns
    the first Ctrl-C into an orderly stop (its trials' state saved, unfinished ones left pending);
    after a run it was not used in, Tune leaves that handler installed, and a later Ctrl-C would
    do nothing."""
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if handler is not None and signal.getsignal(signal.SIGINT) is not handler:
            signal.signal(signal.SIGINT, handler)


def _error_line(error: BaseException) -> str:
    seen: BaseException = error
    while seen.__cause__ is not None:
        seen = seen.__cause__
    lines = [line for line in str(seen).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(seen).__name__


# ------------------------------------------------------------------------------------ the table


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def write_table(output: Path, rows: list[dict[str, Any]], columns: list[str]) -> tuple[Path, Path]:
    """``results.csv`` and ``results.md`` with ``columns`` (in that order)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row.get(key) for key in columns})
    csv_path = output / RESULTS_CSV
    csv_path.write_text(buffer.getvalue())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(key)) for key in columns) + " |" for row in rows]
    md_path = output / RESULTS_MD
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def best_row(rows: list[dict[str, Any]], metric: str = "top1") -> dict[str, Any] | None:
    """The row with the highest ``metric`` among the ones that have it (first wins a tie)."""
    scored = [row for row in rows if isinstance(row.get(metric), (int, float)) and math.isfinite(row[metric])]
    return max(scored, key=lambda row: row[metric]) if scored else None


def finish_sweep(
    state: SweepState,
    rows: list[dict[str, Any]],
    columns: list[str],
    plot: Callable[[Path, list[dict[str, Any]]], Path | None],
    started: float,
    extra: dict[str, Any] | None = None,
    stopped_on_purpose: bool = False,
) -> dict[str, Any]:
    """Write the table, the best trial, the plot and the summary; log them on the parent run.

    Raises:
        Interrupted: trials are left pending, so Tune was stopped (Ctrl-C) rather than
            ``stopped_on_purpose`` (``stop_after_trials``); raised once everything is written, saying
            how to continue.
    """
    output = state.path
    csv_path, md_path = write_table(output, rows, columns)
    best = best_row(rows)
    (output / BEST_FILE).write_text(json.dumps(best, indent=2, default=str))
    try:
        figure = plot(output, rows)
    except ImportError:  # matplotlib is optional
        figure = None
    counts = {status: sum(row["status"] == status for row in rows) for status in STATUSES}
    summary = {
        "sweep": state.kind,
        "trials": len(rows),
        "statuses": {status: count for status, count in counts.items() if count},
        "best": best,
        "rows": rows,
        "table": str(csv_path),
        "markdown": str(md_path),
        "plot": str(figure) if figure else None,
        **(extra or {}),
        "output": state.output,
        "resumed": state.resumed,
        "seconds": round(time.time() - started, 1),
        "mlflow_run_id": state.parent_run_id,
        "tracking_uri": state.tracking_uri,
        "mlflow_ui": ui_command(state.tracking_uri),
    }
    (output / SUMMARY).write_text(json.dumps(summary, indent=2, default=str))
    parent = state.parent_tracker()
    if best is not None:
        parent.log_metrics({"best_top1": best["top1"]}, 0)
        parent.set_tags({"best_trial": best["trial"]})
    parent.log_metrics({f"trials_{status}": float(count) for status, count in counts.items()}, 0)
    for artifact in (csv_path, md_path, output / BEST_FILE, figure, output / SWEEP_FILE, output / SUMMARY):
        if artifact is not None:
            parent.log_artifact(Path(artifact))
    parent.finish("KILLED" if counts["pending"] else "FINISHED")  # KILLED: interrupted, --resume continues it
    if counts["pending"] and not stopped_on_purpose:
        raise Interrupted(
            f"interrupted with {counts['pending']} of {len(rows)} trials unfinished; the table so far is {md_path}; "
            f"continue with moco tune {state.kind} --resume {state.output}"
        )
    if best is not None:
        note(f"tune {state.kind}: best trial {best['trial']}: top-1 {best['top1']:.2f}%; table {md_path}")
    else:
        note(f"tune {state.kind}: no trial finished with a top-1; table {md_path}")
    return summary


def flat_point(point: Point) -> dict[str, Any]:
    """A point's values as table columns (lists joined)."""
    return {key: ",".join(map(str, value)) if isinstance(value, list) else value for key, value in point.items()}


def json_override(key: str, value: Any) -> str:
    """``key=value`` for :func:`pipelines.config.apply_overrides` (JSON is YAML)."""
    return f"{key}={json.dumps(value)}"
