"""Weighted k-nearest-neighbour evaluation of frozen features (the official CIFAR-10 demo's monitor,
after Wu et al. 2018): cheap enough to run every epoch as a validation signal."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def extract_features(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` in eval mode over ``(images, labels)`` batches; return unit features and labels.

    The module's train/eval mode is restored afterwards.

    Shape:
        returns (N, D) float32 features on the CPU and (N,) int64 labels
    """
    was_training = model.training if isinstance(model, nn.Module) else False
    if isinstance(model, nn.Module):
        model.eval()
    features, labels = [], []
    try:
        for images, batch_labels in batches:
            batch_features = model(images.to(device, non_blocking=True))
            features.append(F.normalize(batch_features.float(), dim=1).cpu())
            labels.append(batch_labels.cpu().long())
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)
    if not features:
        raise ValueError("extract_features got no batches")
    return torch.cat(features), torch.cat(labels)


def knn_predict(
    features: torch.Tensor,
    bank_features: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Class scores from the ``k`` most similar bank entries, each voting ``exp(sim / t)``.

    Args:
        features: unit query features.
        bank_features: unit reference features (the training set).
        bank_labels: their labels in ``[0, num_classes)``.

    Shape:
        features: (B, D); bank_features: (N, D); bank_labels: (N,) -> (B, num_classes)
    """
    k = min(k, bank_features.shape[0])
    similarity = features @ bank_features.T  # B x N
    top_similarity, top_index = similarity.topk(k, dim=1)  # B x k
    weights = (top_similarity / temperature).exp()
    neighbour_labels = bank_labels[top_index]  # B x k
    scores = torch.zeros(features.shape[0], num_classes, dtype=weights.dtype, device=features.device)
    return scores.scatter_add_(1, neighbour_labels, weights)


def knn_top1(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int | None = None,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy (percent) of the weighted kNN classifier on the test features."""
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = 0
    for start in range(0, test_features.shape[0], chunk_size):
        scores = knn_predict(
            test_features[start : start + chunk_size], train_features, train_labels, num_classes, k, temperature
        )
        correct += int((scores.argmax(dim=1) == test_labels[start : start + chunk_size]).sum())
    return 100.0 * correct / max(test_features.shape[0], 1)
