"""The linear classification protocol (He et al. 2019, sec. 4.1; official ``main_lincls.py``):
one fully connected layer trained on frozen, global-average-pooled backbone features.

The defaults are the official ones: fc initialised N(0, 0.01) with zero bias, SGD with momentum
0.9, lr 30, no weight decay, 100 epochs, lr x0.1 at epochs 60 and 80, batch 256, cross-entropy.
:func:`train_linear_classifier` trains on features already extracted (the ``cached`` probe and
the Tune grid search); the distributed ``full`` probe steps the same classifier, optimiser and
schedule on features computed batch by batch (``pipelines.evaluate.probe_worker``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moco_core.schedules import Schedule, build_lr_schedule


@dataclass(frozen=True)
class LinearProbeSettings:
    """Hyperparameters of the linear classifier (official ``main_lincls.py`` defaults).

    Attributes:
        lr: initial learning rate (not scaled by the batch size).
        weight_decay: L2 penalty on the fc weights and bias.
        sgd_momentum: SGD momentum.
        epochs: passes over the training features.
        milestones: epochs at which the lr is multiplied by ``gamma``.
        gamma: lr decay factor.
        batch_size: images per step (global).
        seed: order of the training features each epoch (and which augmented copy is used).
    """

    lr: float = 30.0
    weight_decay: float = 0.0
    sgd_momentum: float = 0.9
    epochs: int = 100
    milestones: tuple[int, ...] = (60, 80)
    gamma: float = 0.1
    batch_size: int = 256
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        checks = [
            (self.lr > 0, f"lr={self.lr} is invalid: expected > 0"),
            (self.weight_decay >= 0, f"weight_decay={self.weight_decay} is invalid: expected >= 0"),
            (0 <= self.sgd_momentum < 1, f"sgd_momentum={self.sgd_momentum} is invalid: expected in [0, 1)"),
            (self.epochs >= 1, f"epochs={self.epochs} is invalid: expected >= 1"),
            (list(self.milestones) == sorted(self.milestones), "milestones is invalid: expected increasing epochs"),
            (self.gamma > 0, f"gamma={self.gamma} is invalid: expected > 0"),
            (self.batch_size >= 1, f"batch_size={self.batch_size} is invalid: expected >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def steps_per_epoch(self, num_images: int) -> int:
        """Batches per epoch; the last one may be partial (the official loader keeps it)."""
        return max(1, math.ceil(num_images / self.batch_size))

    def lr_schedule(self, steps_per_epoch: int) -> Schedule:
        """lr per optimisation step: ``lr`` decayed by ``gamma`` at each milestone epoch."""
        milestones = [epoch * steps_per_epoch for epoch in self.milestones]
        return build_lr_schedule(
            "step", self.lr, self.epochs * steps_per_epoch, milestones=milestones, gamma=self.gamma
        )


def build_linear_classifier(feature_dim: int, num_classes: int) -> nn.Linear:
    """The fc layer, initialised as the official code does: weights N(0, 0.01), bias 0.

    Shape:
        (N, feature_dim) -> (N, num_classes)
    """
    classifier = nn.Linear(feature_dim, num_classes)
    nn.init.normal_(classifier.weight, mean=0.0, std=0.01)
    nn.init.zeros_(classifier.bias)
    return classifier


def build_linear_optimizer(classifier: nn.Module, settings: LinearProbeSettings) -> torch.optim.SGD:
    """SGD over the classifier's parameters only (weight decay on the bias too, as official)."""
    return torch.optim.SGD(
        classifier.parameters(), lr=settings.lr, momentum=settings.sgd_momentum, weight_decay=settings.weight_decay
    )


def step_sums(loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(loss x images, top-1 correct, images) of one training step as a float64 tensor on the
    logits' device, computed there: a loop adds them up without waiting for the device each step.

    Shape:
        loss: scalar mean over the batch; logits: (N, C); labels: (N,) -> (3,)
    """
    count = torch.full((), float(len(labels)), dtype=torch.float64, device=logits.device)  # a fill, not a copy
    correct = (logits.detach().argmax(dim=1) == labels).sum().to(torch.float64)
    return torch.stack([loss.detach().to(torch.float64) * count, correct, count])


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """How many rows have their label among the top-k scores, for each k (capped at the classes).

    Shape:
        logits: (N, C); labels: (N,)
    """
    largest = min(max(ks), logits.shape[1])
    top = logits.topk(largest, dim=1).indices
    hits = top == labels.unsqueeze(1)
    return [int(hits[:, : min(k, largest)].any(dim=1).sum()) for k in ks]


@dataclass(frozen=True)
class Accuracy:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy over a set of images."""

    top1: float
    top5: float
    loss: float


@torch.no_grad()
def evaluate_classifier(
    classifier: nn.Module, features: torch.Tensor, labels: torch.Tensor, batch_size: int = 8192
) -> Accuracy:
    """Accuracy of ``classifier`` on ``features``.

    Shape:
        features: (N, D); labels: (N,)
    """
    correct1 = correct5 = 0
    loss_sum = 0.0
    for start in range(0, features.shape[0], batch_size):
        logits = classifier(features[start : start + batch_size])
        batch_labels = labels[start : start + batch_size]
        loss_sum += float(F.cross_entropy(logits.float(), batch_labels, reduction="sum"))
        top1, top5 = topk_correct(logits, batch_labels)
        correct1, correct5 = correct1 + top1, correct5 + top5
    count = max(features.shape[0], 1)
    return Accuracy(100.0 * correct1 / count, 100.0 * correct5 / count, loss_sum / count)


@dataclass(frozen=True)
class EpochRecord:
    """What one epoch of linear training gave: mean training loss / top-1, and the validation
    accuracy when it was evaluated that epoch (None otherwise)."""

    epoch: int
    train_loss: float
    train_top1: float
    val: Accuracy | None


@dataclass
class LinearProbeResult:
    """The trained classifier, the per-epoch history and the final validation accuracy."""

    classifier: nn.Linear
    history: list[EpochRecord] = field(default_factory=list)
    final: Accuracy | None = None


def train_linear_classifier(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    settings: LinearProbeSettings = LinearProbeSettings(),
    *,
    eval_every_epochs: int = 1,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> LinearProbeResult:
    """Train the fc layer on precomputed features with the protocol's optimiser and schedule.

    Each epoch visits every training image once in a new seeded order; when several copies of
    the training features are given (augmented views, extracted once), each image uses one copy
    per epoch, drawn at random. Runs on the features' device.

    Args:
        train_features: one copy ``(N, D)`` or several ``(copies, N, D)``.
        train_labels: labels in ``[0, num_classes)``.
        val_features, val_labels: the validation set, evaluated every ``eval_every_epochs``
            epochs and after the last one.
        num_classes: outputs of the classifier.
        settings: the hyperparameters.
        on_epoch: called with each epoch's record (progress, MLflow).

    Shape:
        train_features: (N, D) or (copies, N, D); train_labels: (N,); val_features: (M, D); val_labels: (M,)
    """
    settings.validate()
    copies = train_features if train_features.dim() == 3 else train_features.unsqueeze(0)
    num_copies, num_images, feature_dim = copies.shape
    device = copies.device
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    classifier = build_linear_classifier(feature_dim, num_classes).to(device)
    optimizer = build_linear_optimizer(classifier, settings)
    steps_per_epoch = settings.steps_per_epoch(num_images)
    schedule = settings.lr_schedule(steps_per_epoch)
    result = LinearProbeResult(classifier)
    step = 0
    for epoch in range(settings.epochs):
        order = torch.randperm(num_images, generator=generator).to(device)
        chosen = torch.randint(num_copies, (num_images,), generator=generator).to(device)
        sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss x images, correct, images
        classifier.train()
        for start in range(0, num_images, settings.batch_size):
            rows = order[start : start + settings.batch_size]
            features, labels = copies[chosen[rows], rows], train_labels[rows]
            for group in optimizer.param_groups:
                group["lr"] = schedule(step)
            logits = classifier(features)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += step_sums(loss, logits, labels)
            step += 1
        last = epoch == settings.epochs - 1
        val = None
        if last or (eval_every_epochs and (epoch + 1) % eval_every_epochs == 0):
            classifier.eval()
            val = evaluate_classifier(classifier, val_features, val_labels)
        record = EpochRecord(epoch, float(sums[0]) / num_images, 100.0 * float(sums[1]) / num_images, val)
        result.history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if last:
            result.final = val
    classifier.eval()
    return result
