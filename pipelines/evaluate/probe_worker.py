"""``moco probe --mode full``: the per-worker loop of the linear classification protocol on Ray Train.

Every worker reads its own lanes of the training stream (RandomResizedCrop + flip views, the
same reader lanes as pretraining), runs the frozen backbone in eval mode without gradients, and
steps the fc layer (DDP over the workers, the only trainable part). Epochs follow from the step
count; at each epoch end the workers sum their loss and accuracy counts, rank 0 evaluates the
validation set (every ``training.eval_every_epochs``), and a checkpoint holds the fc layer, its
optimiser and every lane's stream position, so ``--resume`` continues exactly. After the last
step rank 0 checks that the backbone's weights and BatchNorm statistics are bit-for-bit those it
started from (the official ``sanity_check``); a mismatch fails the probe.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from moco_core.encoders import build_backbone
from moco_core.linear_probe import (
    build_linear_classifier,
    build_linear_optimizer,
    evaluate_classifier,
    step_sums,
)
from moco_core.photometric import normalize_batch
from pipelines.console import note
from pipelines.evaluate.features import require_labels
from pipelines.evaluate.probe_config import ProbeConfig, probe_config_from_mapping
from pipelines.ingest.stream import StreamLayout, StreamProgress, worker_training_batches
from pipelines.pretrain.run_files import write_json
from pipelines.pretrain.tracking import Tracker
from pipelines.ray_runtime import quiet_ray_data
from pipelines.run_console import forward_notes

PROBE_SUMMARY = "probe_worker_summary.json"
CHECKPOINT_FILE = "probe.pt"
CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class ProbePlan:
    """What the driver decided, handed to every worker.

    Attributes:
        backbone: object ref of ``(arch, small_image_stem, state_dict)``.
        feature_dim: the backbone's pooled feature size.
        num_classes: outputs of the fc layer.
        num_images: training images.
        steps_per_epoch: global batches per epoch (the last one of an epoch may reach into the next).
        collection: object ref of the planned training collection.
        layout: the training stream's layout.
        lane_cpus: CPUs per reader lane.
        lane_resources: custom resources each lane requests (``data.reader_resources``).
        train_view: the RandomResizedCrop + flip view function.
        ingest_state: the IngestState actor.
        mean, std: input normalisation.
        val_label_mapping: validation label -> training label (None: the same).
        run_dir, mlflow_run_id, tracking_uri: where results go.
        console: the RunConsole actor the workers' notes go to (pipelines.run_console).
    """

    backbone: Any
    feature_dim: int
    num_classes: int
    num_images: int
    steps_per_epoch: int
    collection: Any
    layout: StreamLayout
    lane_cpus: float
    train_view: Any
    ingest_state: Any
    mean: tuple[float, ...]
    std: tuple[float, ...]
    val_label_mapping: np.ndarray | None
    run_dir: str
    mlflow_run_id: str | None
    tracking_uri: str
    console: Any = None
    lane_resources: dict[str, float] = field(default_factory=dict)


def probe_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: ``{"config": ProbeConfig as dict, "plan": ProbePlan}``."""
    quiet_ray_data()
    if loop_config["plan"].console is not None:
        forward_notes(loop_config["plan"].console)
    config = probe_config_from_mapping(loop_config["config"])
    torch.set_num_threads(config.trainer_threads)
    FullProbeRunner(config, loop_config["plan"]).run()


def backbone_differences(module: torch.nn.Module, reference: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors (weights and BatchNorm buffers) of ``module`` that differ from
    ``reference`` in any bit; the official ``main_lincls.py`` sanity check."""
    current = module.state_dict()
    return [name for name, value in reference.items() if not torch.equal(current[name].cpu(), value.cpu())]


class FullProbeRunner:
    """One worker's share of a full linear probe."""

    def __init__(self, config: ProbeConfig, plan: ProbePlan):
        self.config, self.plan = config, plan
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.settings = config.linear
        self.total_steps = self.settings.epochs * plan.steps_per_epoch
        self.schedule = self.settings.lr_schedule(plan.steps_per_epoch)
        arch, small_image_stem, state_dict = ray.get(plan.backbone)
        backbone, _ = build_backbone(arch, small_image_stem)
        backbone.load_state_dict(state_dict, strict=True)
        self.backbone = backbone.eval().requires_grad_(False).to(self.device)
        precision = config.training.precision
        use_bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        torch.manual_seed(config.training.seed)  # the same initial fc on every rank
        self.classifier = build_linear_classifier(plan.feature_dim, plan.num_classes).to(self.device)
        self.optimizer = build_linear_optimizer(self.classifier, self.settings)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.progress = StreamProgress(plan.layout.total_lanes)
        self.restored = self._restore()
        self.ddp_classifier = (
            ray.train.torch.prepare_model(self.classifier, move_to_device=False) if self.world > 1 else self.classifier
        )
        local_metrics = Path(plan.run_dir) / "metrics.jsonl" if self.rank == 0 and "://" not in plan.run_dir else None
        self.tracker = Tracker(plan.tracking_uri, config.tracking.enabled and self.rank == 0, local_metrics)
        self.tracker.attach(plan.mlflow_run_id if self.rank == 0 else None)

    # ------------------------------------------------------------------ checkpoints

    def _restore(self) -> bool:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return False
        with checkpoint.as_directory() as directory:
            saved = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        if saved.get("format_version") != CHECKPOINT_FORMAT:
            raise ValueError(f"probe checkpoint format {saved.get('format_version')} is not {CHECKPOINT_FORMAT}")
        self.classifier.load_state_dict(saved["classifier"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.step = int(saved["step"])
        self.history = list(saved["history"])
        if StreamLayout(**saved["stream_layout"]) == self.plan.layout:
            positions = saved["stream_positions"].numpy().astype(np.int64)
            self.progress = StreamProgress(self.plan.layout.total_lanes, positions)
        elif self.rank == 0:
            note("the stream layout changed since the checkpoint: the training stream restarts at its beginning")
        if self.rank == 0:
            note(f"resuming the probe at epoch {self.step // self.plan.steps_per_epoch}")
        return True

    def _stream_positions(self) -> torch.Tensor:
        positions = torch.from_numpy(self.progress.positions).to(self.device)
        if self.world > 1:
            dist.all_reduce(positions, op=dist.ReduceOp.MAX)
        return positions.cpu()

    def _report(self, metrics: dict[str, float]) -> None:
        """All ranks together; rank 0 writes the checkpoint."""
        positions = self._stream_positions()
        epoch = self.step // self.plan.steps_per_epoch
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if self.rank == 0:
                torch.save(
                    {
                        "format_version": CHECKPOINT_FORMAT,
                        "classifier": self.classifier.state_dict(),
                        "optimizer": self.optimizer.state_dict(),
                        "step": self.step,
                        "history": self.history,
                        "stream_layout": self.plan.layout.__dict__,
                        "stream_positions": positions,
                    },
                    Path(directory) / CHECKPOINT_FILE,
                )
                config_text = yaml.safe_dump(self.config_dict, sort_keys=False)
                (Path(directory) / "config.yaml").write_text(config_text)
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_epoch{epoch:04d}")

    @property
    def config_dict(self) -> dict[str, Any]:
        from pipelines.config import to_dict

        return to_dict(self.config)

    # ------------------------------------------------------------------ the loop

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        inputs = normalize_batch(images.to(self.device, non_blocking=True), self.plan.mean, self.plan.std)
        with torch.no_grad(), torch.autocast(self.device.type, self.autocast_dtype, self.autocast_dtype is not None):
            return self.backbone(inputs).float()

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        return worker_training_batches(
            self.plan,
            self.progress,
            worker=self.rank,
            batch_size=self.config.per_worker_batch_size,
            pin_memory=self.device.type == "cuda",
        )

    def _validate(self) -> tuple[float, float, float]:
        """(top-1, top-5, loss) on the validation set; rank 0 computes, every rank gets it."""
        result = torch.zeros(3, device=self.device)
        if self.rank == 0:
            features, labels = [], []
            shard = ray.train.get_dataset_shard("val")
            for batch in shard.iter_torch_batches(batch_size=self.config.cached.batch_size):
                features.append(self._features(batch["image"]))
                require_labels(batch["label"].cpu().numpy(), "--val")
                labels.append(batch["label"].to(self.device))
            label_tensor = torch.cat(labels)
            if self.plan.val_label_mapping is not None:
                mapping = torch.from_numpy(self.plan.val_label_mapping).to(self.device)
                label_tensor = mapping[label_tensor]
            accuracy = evaluate_classifier(self.classifier.eval(), torch.cat(features), label_tensor)
            self.classifier.train()
            result = torch.tensor([accuracy.top1, accuracy.top5, accuracy.loss], device=self.device)
        if self.world > 1:
            dist.broadcast(result, src=0)
        return float(result[0]), float(result[1]), float(result[2])

    def run(self) -> None:
        iterator = self._batches()
        started, first_step = time.perf_counter(), self.step
        sums = torch.zeros(3, device=self.device, dtype=torch.float64)  # loss x images, correct, images
        stopped = ""
        try:
            while self.step < self.total_steps:
                batch = next(iterator, None)
                if batch is None:
                    stopped = f"the training stream ended at step {self.step}"
                    break
                self._maybe_change_backbone()
                sums += self._train_step(batch)
                self.step += 1
                if self.step % self.plan.steps_per_epoch == 0 or self.step == self.total_steps:
                    self._end_epoch(sums)
                    sums.zero_()
        finally:
            iterator.close()
        self._finish(stopped, time.perf_counter() - started, first_step)

    def _train_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        require_labels(batch["label"].numpy(), "--train")  # on the host: no device sync
        labels = batch["label"].to(self.device)
        features = self._features(batch["image"])
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule(self.step)
        logits = self.ddp_classifier(features)
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return step_sums(loss, logits, labels)

    def _maybe_change_backbone(self) -> None:
        at = self.config.debug.change_backbone_at_step
        if at and not self.restored and self.step == at and self.rank == 0:
            with torch.no_grad():
                next(self.backbone.parameters()).add_(1e-3)

    def _end_epoch(self, sums: torch.Tensor) -> None:
        if self.world > 1:
            dist.all_reduce(sums)
        epoch = math.ceil(self.step / self.plan.steps_per_epoch)
        final = self.step == self.total_steps
        every = self.config.training.eval_every_epochs
        record: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": float(sums[0] / sums[2]),
            "train_top1": float(100 * sums[1] / sums[2]),
            "lr": self.schedule(self.step - 1),
        }
        if final or (every and epoch % every == 0):
            record["val_top1"], record["val_top5"], record["val_loss"] = self._validate()
        self.history.append(record)
        if self.rank == 0:
            self.tracker.log_metrics({key: value for key, value in record.items() if key != "epoch"}, epoch)
            shown = (
                f" | val top-1 {record['val_top1']:.2f}% top-5 {record['val_top5']:.2f}%"
                if "val_top1" in record
                else ""
            )
            note(
                f"probe epoch {epoch}/{self.settings.epochs} | loss {record['train_loss']:.4f} | "
                f"train top-1 {record['train_top1']:.2f}%{shown} | lr {record['lr']:.4g}"
            )
        if final or epoch % self.config.checkpoint.every_epochs == 0:
            self._report({"epoch": epoch, "train_loss": record["train_loss"]})

    def _finish(self, stopped: str, seconds: float, first_step: int) -> None:
        outcome: dict[str, Any] = {"steps": self.step, "stopped": stopped, "history": self.history}
        if self.rank == 0:
            reference = ray.get(self.plan.backbone)[2]
            changed = backbone_differences(self.backbone, reference)
            outcome["sanity_check"] = "failed" if changed else "passed"
            outcome["changed_backbone_tensors"] = changed[:10]
            outcome["images_per_s"] = (self.step - first_step) * self.config.optim.batch_size / max(seconds, 1e-9)
            final = next((record for record in reversed(self.history) if "val_top1" in record), None)
            if final is not None and not stopped:
                outcome["top1"], outcome["top5"] = final["val_top1"], final["val_top5"]
            write_json(self.plan.run_dir, PROBE_SUMMARY, outcome)
        ray.train.report({"steps": self.step})
