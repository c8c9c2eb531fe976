"""The pretraining run plan: every decision the driver takes once, handed to every worker."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipelines.ingest.stream import StreamLayout
from pipelines.ingest.views import TwoViewFunction


@dataclass(frozen=True)
class PretrainPlan:
    """What the driver worked out; workers act on it and never re-derive it.

    Attributes:
        total_steps: optimisation steps of the whole run.
        steps_per_epoch: global batches per pass over the training collection.
        num_images: images in the training collection.
        run_dir: the run directory (local path or URI).
        collection: object ref of the planned training collection (pipelines.ingest.units.Collection).
        layout: how the collection is grouped and dealt to every worker's lanes.
        lane_cpus: CPUs each reader lane reserves (all lanes run for the whole run).
        lane_resources: custom resources each lane requests (``data.reader_resources``).
        train_view: the two-view transform the lanes apply.
        ingest_state: the IngestState actor counting delivered / skipped images.
        mlflow_run_id: the run's MLflow run (None when tracking is off or failed).
        tracking_uri: the MLflow tracking URI (None: tracking disabled).
        has_knn: labelled evaluation data was given (``knn_bank`` / ``knn_query`` datasets).
        num_classes: classes of the evaluation labels, when known.
        console: the RunConsole actor (pipelines.run_console) the workers' notes and steps go to.
        resume_from: the checkpoint ``--resume`` continues from, used when Ray Train hands over none.
        damaged_checkpoints: checkpoints the driver found damaged and reported; never loaded.
    """

    total_steps: int
    steps_per_epoch: int
    num_images: int
    run_dir: str
    collection: Any
    layout: StreamLayout
    lane_cpus: float
    train_view: TwoViewFunction
    ingest_state: Any
    mlflow_run_id: str | None
    tracking_uri: str | None
    has_knn: bool
    num_classes: int | None
    console: Any
    resume_from: str | None = None
    damaged_checkpoints: tuple[str, ...] = ()
    lane_resources: dict[str, float] = field(default_factory=dict)
