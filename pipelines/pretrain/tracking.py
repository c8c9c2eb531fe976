"""Run tracking: MLflow when it works, and always a local JSONL record, so nothing is lost.

MLflow is imported lazily and every call is guarded: if the tracking server is down or the
store is unwritable, the run warns once and goes on; metrics still reach ``metrics.jsonl`` in
the run directory. Only the driver and rank 0 ever create a :class:`Tracker`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from pipelines.console import debug_enabled, note

DEFAULT_STORE_DIR = "mlruns"


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite store in ./mlruns (no server needed)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store = Path(DEFAULT_STORE_DIR).resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def _artifact_root(uri: str) -> Path | None:
    """Artifacts of a local SQLite store live beside it (MLflow's default is the current directory)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :]).resolve().parent / "artifacts"


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on ``uri``."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


class Tracker:
    """One MLflow run, written to by this process; failures warn once and disable MLflow.

    Args:
        uri: tracking URI (see :func:`default_tracking_uri`); None only when not ``enabled``.
        enabled: False records only the local JSONL.
        metrics_path: where every logged metric is appended as a JSON line.
    """

    def __init__(self, uri: str | None, enabled: bool, metrics_path: Path | None = None):
        self.uri = uri
        self.enabled = enabled
        self.metrics_path = metrics_path
        self.run_id: str | None = None
        self._mlflow: Any = None
        self._warned = False

    def _call(self, what: str, function, *args, **kwargs) -> Any:
        if not self.enabled:
            return None
        try:
            return function(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 -- tracking must never stop training
            if not self._warned:
                note(
                    f"warning: MLflow {what} failed ({type(error).__name__}: {error}); training goes on, "
                    f"metrics are kept in {self.metrics_path or 'memory only'}"
                )
                self._warned = True
            self.enabled = False
            return None

    def _client(self) -> Any:
        if self._mlflow is None:
            # MLflow retries an unreachable server for minutes by default; a training run should
            # notice within seconds and carry on (users' own settings win).
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
            import mlflow

            if not debug_enabled():  # e.g. "Creating initial MLflow database tables..."
                logging.getLogger("mlflow").setLevel(logging.WARNING)

            mlflow.set_tracking_uri(self.uri)
            self._mlflow = mlflow.MlflowClient(tracking_uri=self.uri)
        return self._mlflow

    def start(self, experiment: str, run_name: str | None, parent_run_id: str | None) -> str | None:
        """Create the run (nested under ``parent_run_id`` if given); returns its id."""

        def create() -> str:
            client = self._client()
            found = client.get_experiment_by_name(experiment)
            if found is None:
                root = _artifact_root(self.uri)
                experiment_id = client.create_experiment(experiment, artifact_location=root.as_uri() if root else None)
            else:
                experiment_id = found.experiment_id
            tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
            run = client.create_run(experiment_id, run_name=run_name, tags=tags)
            return run.info.run_id

        self.run_id = self._call("run creation", create)
        return self.run_id

    def attach(self, run_id: str | None, reopen: bool = False) -> None:
        """Log into an existing run (workers, resumed runs); ``reopen``: mark it RUNNING again
        (a resumed run was left FAILED or KILLED)."""
        self.run_id = run_id
        if run_id is None:
            self.enabled = False
        elif reopen:
            self._call("run update", lambda: self._client().update_run(run_id, status="RUNNING"))

    def log_params(self, params: dict[str, Any]) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Param

        items = [Param(key, str(value)[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit
            self._call("parameter logging", self._client().log_batch, self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.metrics_path is not None:
            with self.metrics_path.open("a") as handle:
                handle.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        if self.run_id is None or not self.enabled:
            return
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        batch = [Metric(key, float(value), timestamp, step) for key, value in metrics.items()]
        self._call("metric logging", self._client().log_batch, self.run_id, metrics=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.run_id is not None and path.exists():
            self._call("artifact upload", self._client().log_artifact, self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.run_id is None:
            return
        for key, value in tags.items():
            self._call("tagging", self._client().set_tag, self.run_id, key, value)

    def finish(self, status: str) -> None:
        """``status``: FINISHED, FAILED or KILLED."""
        if self.run_id is not None:
            self._call("run completion", self._client().set_terminated, self.run_id, status)
