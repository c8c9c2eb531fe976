"""The per-worker pretraining loop that Ray Train runs on every worker.

``train_loop_per_worker`` rebuilds the config and runs :class:`PretrainRunner`: build the model
(DDP over the worker group), restore the newest intact checkpoint if Ray Train hands one over
(a restart after a failure, or a resumed run), build this worker's own lanes of the Ray Data stream
from the checkpoint's stream positions, then step. Epoch ends, logging and checkpoints follow
from the step count alone, so every rank takes them together without talking; the only
collectives outside the model are at log and checkpoint steps (is any loss non-finite, where
is every lane), never per step, so an accelerator's queue never drains for a host sync.
"""

from __future__ import annotations

import copy
import json
import posixpath
import tempfile
import time
from collections.abc import Generator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from moco_core.knn import extract_features, knn_top1
from moco_core.loss import ContrastiveLoss
from moco_core.mechanisms import ContrastiveModel
from moco_core.model import build_model
from moco_core.photometric import InputBuffers, normalize_batch
from moco_core.schedules import build_lr_schedule, build_momentum_schedule
from moco_core.training import (
    ComputeSettings,
    build_optimizer,
    compile_encoders,
    forward_backward_seconds,
    train_step,
)
from pipelines.console import format_duration, note
from pipelines.filesystems import join, resolve_filesystem
from pipelines.host_allocator import apply_host_allocator
from pipelines.ingest.stream import (
    StreamLayout,
    StreamProgress,
    restart_positions,
    worker_training_batches,
)
from pipelines.pretrain.checkpoints import (
    TRAIN_DIR,
    DamagedCheckpoint,
    RankRandomState,
    TrainingState,
    checkpoint_name,
    checkpoints_not_after,
    load_checkpoint,
    newest_checkpoint_name,
    read_pointer,
    save_checkpoint,
    verify_checkpoint,
    write_pointer,
)
from pipelines.pretrain.config import PretrainConfig, config_from_mapping, config_to_dict
from pipelines.pretrain.plan import PretrainPlan
from pipelines.pretrain.run_files import write_json
from pipelines.pretrain.tracking import Tracker
from pipelines.ray_runtime import quiet_ray_data
from pipelines.run_console import forward_notes

WORKER_SUMMARY = "worker_summary.json"
#: images in the start-up forward + backward that picks the precision (``training.precision: auto``)
PRECISION_PROBE_IMAGES = 8
#: ``auto`` picks bf16 on a CPU only when the probe finds it at least this much faster: on a CPU
#: where the two are close (5-7% apart on one 2-core host, 2026-12-02), the probe's noise picked
#: either one run to run, so runs of the same config trained in different precisions
BF16_MIN_SPEEDUP = 1.1


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point. ``loop_config``: ``{"config": <PretrainConfig as dict>, "plan": PretrainPlan}``."""
    quiet_ray_data()
    plan: PretrainPlan = loop_config["plan"]
    forward_notes(plan.console)
    config = config_from_mapping(loop_config["config"])
    # The trainer's CPUs, no more: the reader lanes have the others (issue: oversubscribed cores
    # made the job run at a fraction of its own step's speed).
    torch.set_num_threads(config.trainer_threads)
    PretrainRunner(config, plan).run()


def compute_settings(
    config: PretrainConfig, device: torch.device, model: ContrastiveModel | None = None
) -> tuple[ComputeSettings, str]:
    """Autocast dtype and layout from ``training.precision`` / ``training.channels_last``, and why.

    ``auto`` on a CPU times a forward and backward of (a copy of) ``model``'s query encoder in
    fp32 and in bf16 at the run's image size and picks bf16 only if it is ``BF16_MIN_SPEEDUP``
    times faster; on a GPU it is bf16 where the GPU supports it.
    """
    channels_last = config.training.channels_last
    if config.training.precision != "auto":
        dtype = torch.bfloat16 if config.training.precision == "bf16" else None
        return ComputeSettings(dtype, channels_last), f"training.precision={config.training.precision}"
    if device.type != "cpu" or model is None:
        dtype = ComputeSettings.for_device(device).autocast_dtype
        return ComputeSettings(dtype, channels_last), "the device's native precision"
    encoder = copy.deepcopy(model.query_encoder).to(device)
    if channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    size = config.augment.size
    probe = torch.randn(min(config.per_worker_batch_size, PRECISION_PROBE_IMAGES), 3, size, size, device=device)
    fp32 = forward_backward_seconds(encoder, probe, ComputeSettings(None, channels_last))
    seconds = {
        "fp32": fp32,
        "bf16": forward_backward_seconds(encoder, probe, ComputeSettings(torch.bfloat16, channels_last), 2, 3 * fp32),
    }
    faster = seconds["bf16"] * BF16_MIN_SPEEDUP <= seconds["fp32"]
    timing = ", ".join(f"{name} {1000 * value:.0f} ms" for name, value in seconds.items())
    why = "faster here" if faster else f"bf16 not {BF16_MIN_SPEEDUP:g}x faster here"
    return ComputeSettings(torch.bfloat16 if faster else None, channels_last), (
        f"{why} ({timing} per forward+backward of {len(probe)})"
    )


def compiles_encoders(config: PretrainConfig, device: torch.device) -> bool:
    """``training.compile``: ``auto`` compiles the encoders on CUDA (where it pays: docs/BENCHMARKS.md)
    and not on CPUs, where compiling takes minutes and was not measured to pay."""
    if config.training.compile == "auto":
        return device.type == "cuda"
    return config.training.compile == "encoders"


@dataclass
class _Window:
    """Timing of the steps since the last log line."""

    start: float = field(default_factory=time.perf_counter)
    waiting: float = 0.0
    steps: int = 0


class PretrainRunner:
    """One worker's share of a pretraining run.

    Args:
        config: the validated job config.
        plan: what the driver decided (steps, the stream layout, the MLflow run, ...).
    """

    def __init__(self, config: PretrainConfig, plan: PretrainPlan):
        self.config = config
        self.plan = plan
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        # Before the model and the first batch: every step reuses the pages of the one before.
        self.host_memory_reused = apply_host_allocator(config.training.host_allocator)
        self.augment = config.augment.resolve(on_gpu=self.device.type == "cuda")
        torch.manual_seed(config.training.seed + self.rank)
        self.total_steps = plan.total_steps
        self.run_dir = plan.run_dir
        local_metrics = Path(self.run_dir) / "metrics.jsonl" if self.rank == 0 and "://" not in self.run_dir else None
        self.tracker = Tracker(plan.tracking_uri, config.tracking.enabled and self.rank == 0, local_metrics)
        self.tracker.attach(plan.mlflow_run_id if self.rank == 0 else None)

        model = build_model(config.model, num_samples=plan.num_images)
        self.settings = self._agreed_settings(model)
        if self.settings.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.to(self.device)
        if compiles_encoders(config, self.device):
            compile_encoders(self.model)
            if self.rank == 0:
                note("torch.compile: the encoders are compiled during the first steps (training.compile)")
        self.optimizer = build_optimizer(self.model, config.optim.weight_decay, config.optim.sgd_momentum)
        milestones = [int(round(epoch * plan.steps_per_epoch)) for epoch in config.optim.milestones]
        self.lr = build_lr_schedule(
            config.optim.schedule,
            config.base_lr,
            self.total_steps,
            milestones=milestones,
            gamma=config.optim.gamma,
            every=config.optim.decay_every_steps,
            warmup_steps=config.optim.warmup_steps,
        )
        self.momentum = build_momentum_schedule(config.momentum.schedule, config.momentum.base, self.total_steps)
        self.generator = torch.Generator().manual_seed(config.training.seed * 1000 + self.rank)
        self.inputs = InputBuffers()
        self.state = TrainingState(total_steps=self.total_steps, mlflow_run_id=plan.mlflow_run_id)
        self.progress = StreamProgress(plan.layout.total_lanes)
        self.restored = self._restore()
        # DDP after restoring, so every rank starts from the same weights. Buffers (queue, BN
        # statistics) are kept consistent by the algorithm itself, not broadcast every step.
        self.ddp_model = (
            ray.train.torch.prepare_model(
                self.model, move_to_device=False, parallel_strategy_kwargs={"broadcast_buffers": False}
            )
            if self.world > 1
            else self.model
        )
        # Set when any step's loss is non-finite; read (one all-reduce) only at log and checkpoint steps.
        self.non_finite = torch.zeros(1, dtype=torch.int64, device=self.device)

    def _agreed_settings(self, model: ContrastiveModel) -> ComputeSettings:
        """Rank 0's precision choice, on every rank."""
        settings, reason = compute_settings(self.config, self.device, model)
        if self.world > 1:
            use_bf16 = torch.tensor([settings.autocast_dtype is not None], dtype=torch.int64, device=self.device)
            dist.broadcast(use_bf16, src=0)
            settings = ComputeSettings(torch.bfloat16 if use_bf16.item() else None, settings.channels_last)
        if self.rank == 0:
            note(f"precision: {'bf16 autocast' if settings.autocast_dtype else 'fp32'} ({reason})")
            self.tracker.set_tags({"precision": settings.precision})
        return settings

    # ------------------------------------------------------------------ restore / checkpoint

    def _restore(self) -> bool:
        """Restore the newest intact checkpoint at or before the newest of: the one Ray Train hands
        over (a restart after a failure), the one ``--resume`` chose, and, on a restart, the one the
        run's pointer file records (it can be newer than Ray Train's: :func:`newest_checkpoint_name`).

        A damaged checkpoint (a truncated or altered file) is passed over with one warning for the
        one before it among the run directory's ``checkpoint_step*`` (the newest ``checkpoint.keep``).
        """
        registered = ray.train.get_checkpoint()
        try:
            pointer = read_pointer(self.run_dir)
        except DamagedCheckpoint:  # the driver warned about it; the checkpoints themselves are listed below
            pointer = None
        newest = newest_checkpoint_name(
            registered.path if registered is not None else None,
            self.plan.resume_from,
            pointer["path"] if pointer is not None else None,
        )
        if newest is None:
            return False
        loaded = None
        for path in checkpoints_not_after(self.run_dir, posixpath.basename(newest)):
            if path in self.plan.damaged_checkpoints:  # found and reported by the driver
                continue
            try:
                with ray.train.Checkpoint(path).as_directory() as directory:
                    loaded = load_checkpoint(Path(directory), self.model, self.optimizer)
                break
            except DamagedCheckpoint as damage:
                if self.rank == 0:
                    note(f"warning: {damage}; restoring an older checkpoint")
        if loaded is None:
            raise DamagedCheckpoint(f"no intact checkpoint to restore in {join(self.run_dir, TRAIN_DIR)}")
        self.state, random_states = loaded
        self.state.total_steps = self.total_steps
        if len(random_states) == self.world:
            random_states[self.rank].restore(self.generator, self.device)
        layout = self.plan.layout
        if self.state.stream_layout and self.state.stream_positions is not None:
            saved = StreamLayout(**self.state.stream_layout)
            positions = np.array(self.state.stream_positions, dtype=np.int64)
            self.progress = StreamProgress(layout.total_lanes, restart_positions(layout, saved, positions))
            if saved != layout and self.rank == 0:
                note(
                    "the stream layout changed since the checkpoint (workers or readers): restarting every reader "
                    "at the oldest group in flight, so a few groups of images are seen twice"
                )
        if self.rank == 0:
            note(f"resuming at step {self.state.step} (epoch {self.state.epoch})")
        return True

    def _random_states(self) -> list[RankRandomState]:
        """Every rank's RNG streams, gathered to all ranks (checkpoint steps only)."""
        mine = RankRandomState.capture(self.generator, self.device)
        if self.world == 1:
            return [mine]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, mine)
        return gathered

    def _stream_positions(self) -> np.ndarray:
        """Every lane's last consumed position (each lane belongs to one rank: max-reduce)."""
        positions = torch.from_numpy(self.progress.positions).to(self.device)
        if self.world > 1:
            dist.all_reduce(positions, op=dist.ReduceOp.MAX)
        return positions.cpu().numpy()

    def _report(self, metrics: dict[str, float], with_checkpoint: bool) -> None:
        """All ranks call this together (ray.train.report is a barrier); rank 0 writes the checkpoint."""
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        self.state.stream_layout = asdict(self.plan.layout)
        self.state.stream_positions = self._stream_positions().tolist()
        random_states = self._random_states()
        name = self._checkpoint_name()
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if self.rank == 0:
                save_checkpoint(
                    Path(directory),
                    self.model,
                    self.optimizer,
                    self.state,
                    config_to_dict(self.config),
                    random_states,
                )
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        if self.rank == 0:  # report returned: the checkpoint is in storage
            stored = join(join(self.run_dir, TRAIN_DIR), name)
            try:  # sizes against state.json; checksums too where reading back is local
                verify_checkpoint(stored, checksums="://" not in stored)
            except DamagedCheckpoint as damage:
                note(f"warning: the checkpoint just written is damaged in storage: {damage}; it is not recorded")
                return
            write_pointer(self.run_dir, stored, self.state)
            damage_at = self.config.debug.damage_checkpoint_at_step
            if damage_at == self.state.step and not self.restored and "://" not in stored:
                model_file = Path(stored) / "model.pt"
                model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])

    def _checkpoint_name(self) -> str:
        """This step's checkpoint directory: a new name when one exists already (written before a
        restart that fell back past it), so Ray Train never records one directory twice."""
        name = checkpoint_name(self.state.step)
        if self.rank == 0:
            filesystem, base = resolve_filesystem(join(self.run_dir, TRAIN_DIR))
            attempt = 0
            while filesystem.get_file_info(posixpath.join(base, name)).type != pafs.FileType.NotFound:
                attempt += 1
                name = checkpoint_name(self.state.step, attempt)
        if self.world > 1:  # every rank reports the same directory
            shared = [name]
            dist.broadcast_object_list(shared, src=0)
            name = shared[0]
        return name

    # ------------------------------------------------------------------ kNN monitor

    def _knn_top1(self) -> float | None:
        """kNN top-1 (percent) of the current backbone on the labelled eval data; rank 0 computes."""
        if not self.plan.has_knn:
            return None
        result = torch.zeros(1, device=self.device)
        if self.rank == 0:
            bank_features, bank_labels = self._features("knn_bank")
            query_features, query_labels = self._features("knn_query")
            result[0] = knn_top1(
                bank_features,
                bank_labels,
                query_features,
                query_labels,
                num_classes=self.plan.num_classes,
                k=self.config.eval.knn_k,
                temperature=self.config.eval.knn_temperature,
            )
        if self.world > 1:
            dist.broadcast(result, src=0)
        return float(result[0])

    def _features(self, dataset_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit backbone features and labels of an eval dataset (moco_core.knn.extract_features)."""
        shard = ray.train.get_dataset_shard(dataset_name)
        mean, std = self.augment.mean, self.augment.std
        batches = (
            (self.settings.prepare(normalize_batch(batch["image"].to(self.device), mean, std)), batch["label"])
            for batch in shard.iter_torch_batches(batch_size=self.config.eval.batch_size)
        )
        with self.settings.autocast(self.device):
            return extract_features(self.model.query_encoder.backbone, batches, self.device)

    # ------------------------------------------------------------------ the loop

    def _any_non_finite(self) -> bool:
        """Whether any rank's loss was non-finite at any step so far (one all-reduce)."""
        flag = self.non_finite.clone()
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _step(self, batch: dict[str, torch.Tensor]) -> ContrastiveLoss:
        step = self.state.step
        query, key = (
            self.inputs.prepare(name, batch[name].to(self.device, non_blocking=True), self.augment, self.generator)
            for name in ("query", "key")
        )
        indices = batch["index"] if self.config.model.mechanism == "memory_bank" else None
        return train_step(
            self.ddp_model,
            self.optimizer,
            query,
            key,
            lr=self.lr(step),
            momentum=self.momentum(step),
            sample_indices=indices,
            settings=self.settings,
        )

    def _batches(self) -> Generator[dict[str, torch.Tensor], None, None]:
        """This worker's lanes of the training stream, from the restored positions on."""
        return worker_training_batches(
            self.plan,
            self.progress,
            worker=self.rank,
            batch_size=self.config.per_worker_batch_size,
            pin_memory=self.device.type == "cuda",
        )

    def run(self) -> None:
        if not self.restored and self.plan.has_knn:
            self.state.knn_top1_random_init = self._knn_top1()  # the same backbone before any training
            if self.rank == 0:
                note(f"kNN top-1 at random initialisation: {self.state.knn_top1_random_init:.2f}%")
        iterator = self._batches()
        try:
            stopped, last, first_step, started = self._train(iterator)
        finally:
            iterator.close()  # stops this worker's lanes
        self._finish(stopped, first_step, started, last)

    def _train(self, iterator: Iterator[dict[str, torch.Tensor]]) -> tuple[str, dict[str, float], int, float]:
        """Steps until ``total_steps`` or a stop; returns (why it stopped, last logged metrics,
        first step, start time)."""
        config, steps_per_epoch = self.config, self.plan.steps_per_epoch
        window, started, first_step = _Window(), time.perf_counter(), self.state.step
        last: dict[str, float] = {}
        stopped = ""
        while self.state.step < self.total_steps:
            waited = time.perf_counter()
            batch = next(iterator, None)
            window.waiting += time.perf_counter() - waited
            if batch is None:
                stopped = f"the training stream ended at step {self.state.step}"
                break
            if config.debug.record_batches:
                self._record_batch(batch)
            self._maybe_inject_failure()
            result = self._step(batch)
            self.non_finite |= (~torch.isfinite(result.loss.detach())).to(torch.int64).reshape(1)
            self.state.step += 1
            self.state.images_seen += config.optim.batch_size
            window.steps += 1
            step = self.state.step
            if self.rank == 0:  # what an interrupted run reports (no reply awaited)
                self.plan.console.reached.remote(step)
            epoch_ended, final = step % steps_per_epoch == 0, step >= self.total_steps
            self.state.epoch = step // steps_per_epoch
            every = config.checkpoint.every_steps
            checkpoint_now = final or (every and step % every == 0) or (epoch_ended and config.checkpoint.at_epoch_end)
            log_now = epoch_ended or final or step % config.training.log_every_steps == 0
            if (log_now or checkpoint_now) and self._any_non_finite():
                stopped = f"loss became non-finite by step {step}"
                break
            if log_now:
                last = self._log_step(result, window, self.state.epoch)
                window = _Window()
            if epoch_ended and config.eval.every_epochs and self.state.epoch % config.eval.every_epochs == 0:
                if not final:
                    self._log_knn(self.state.epoch)
            if checkpoint_now:
                self._report(
                    {"step": step, "epoch": self.state.epoch, "loss": last.get("loss", float("nan"))},
                    with_checkpoint=True,
                )
        return stopped, last, first_step, started

    def _record_batch(self, batch: dict[str, torch.Tensor]) -> None:
        """debug.record_batches: which images the next step trains on, appended per rank."""
        if "://" in self.run_dir:
            return
        record = {"step": self.state.step + 1, "epoch": batch["epoch"].tolist(), "index": batch["index"].tolist()}
        with open(Path(self.run_dir) / f"debug_batches_rank{self.rank}.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _maybe_inject_failure(self) -> None:
        fail_at = self.config.debug.fail_at_step
        if fail_at and not self.restored and self.state.step == fail_at and self.rank == self.world - 1:
            raise RuntimeError(f"injected failure at step {fail_at} (debug.fail_at_step)")

    def _log_knn(self, epoch: int) -> None:
        knn = self._knn_top1()
        if self.rank == 0 and knn is not None:
            self.tracker.log_metrics({"knn_top1": knn}, self.state.step)
            note(f"epoch {epoch} reached: kNN top-1 {knn:.2f}%")

    def _log_step(self, result: ContrastiveLoss, window: _Window, epoch: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        step = self.state.step - 1
        metrics = {
            "loss": result.loss.item(),
            "pretext_top1": result.pretext_top1.item(),
            "pretext_top5": result.pretext_top5.item(),
            "lr": self.lr(step),
            "momentum": self.momentum(step),
            "images_per_s": window.steps * self.config.optim.batch_size / elapsed,
            "data_wait_fraction": window.waiting / elapsed,
            "epoch": float(epoch),
        }
        if self.rank == 0:
            skipped = ray.get(self.plan.ingest_state.snapshot.remote())["skipped"]
            metrics["skipped_images"] = float(skipped)
            self.tracker.log_metrics(metrics, self.state.step)
            remaining = (self.total_steps - self.state.step) * self.config.optim.batch_size / metrics["images_per_s"]
            note(
                f"step {self.state.step}/{self.total_steps} epoch {epoch} | {metrics['images_per_s']:.0f} img/s | "
                f"loss {metrics['loss']:.4f} | pretext top-1 {metrics['pretext_top1']:.1f}% | lr {metrics['lr']:.4g} | "
                f"m {metrics['momentum']:.4f} | data wait {100 * metrics['data_wait_fraction']:.0f}% | "
                f"skipped {skipped} | ETA {format_duration(remaining)}"
            )
        return metrics

    def _queue_identical(self) -> bool | None:
        """Whether every rank holds the same key queue (it must: keys are gathered before enqueue)."""
        queue = getattr(self.model, "queue", None)
        if queue is None:
            return None
        checksum = torch.stack([queue.keys.double().sum(), queue.keys.double().square().sum(), queue.pointer.double()])
        if self.world == 1:
            return True
        gathered = [torch.empty_like(checksum) for _ in range(self.world)]
        dist.all_gather(gathered, checksum)
        return all(torch.equal(gathered[0], other) for other in gathered[1:])

    def _finish(self, stopped: str, first_step: int, started: float, last: dict[str, float]) -> None:
        """Final kNN, then one last report; rank 0 writes the outcome to the run directory."""
        knn = None if stopped else self._knn_top1()
        elapsed = max(time.perf_counter() - started, 1e-9)
        outcome: dict[str, Any] = {
            "steps": self.state.step,
            "started_at_step": first_step,  # 0, or the checkpoint's step after a restart or --resume
            "images_seen": self.state.images_seen,
            "images_per_s": (self.state.step - first_step) * self.config.optim.batch_size / elapsed,
            "final_loss": last.get("loss"),
            "pretext_top1": last.get("pretext_top1"),
            "knn_top1": knn,
            "knn_top1_random_init": self.state.knn_top1_random_init,
            "precision": self.settings.precision,
            "host_memory_reused": self.host_memory_reused,
        }
        if stopped:
            outcome["stopped"] = stopped
        outcome["queue_identical_across_workers"] = self._queue_identical()
        if self.rank == 0:
            counts = ray.get(self.plan.ingest_state.snapshot.remote())
            outcome.update(
                skipped_images=counts["skipped"],
                skipped_by_reason=counts["skipped_by_reason"],
                converted_by_mode=counts["converted_by_mode"],
            )
            if knn is not None:
                self.tracker.log_metrics({"knn_top1": knn}, self.state.step)
            if stopped:
                note(f"stopped: {stopped}")
            write_json(self.run_dir, WORKER_SUMMARY, outcome)
        ray.train.report({"steps": self.state.step})
