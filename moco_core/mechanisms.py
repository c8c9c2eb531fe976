"""The three contrastive mechanisms of MoCo's Figure 3 behind one interface.

Each is an ``nn.Module`` whose ``forward(query_view, key_view, momentum=..., sample_indices=...)``
runs one step's contrastive forward pass, updates its dictionary, and returns a
:class:`~moco_core.loss.ContrastiveLoss`. Swapping mechanisms is a config change
(:class:`~moco_core.model.ModelConfig.mechanism`), which is how the paper's ablation is run.

* :class:`MoCo` -- momentum encoder + queue (https://arxiv.org/abs/1911.05722).
* :class:`EndToEnd` -- keys from the query encoder, with gradients; negatives are the batch.
* :class:`MemoryBankModel` -- positives and negatives from a per-sample memory bank.
"""

from __future__ import annotations

import torch
from torch import nn

from moco_core import distributed
from moco_core.batchnorm import BatchNormMode, encode_with_shuffled_batch
from moco_core.loss import ContrastiveLoss, in_batch_info_nce, info_nce
from moco_core.memory_bank import MemoryBank
from moco_core.momentum import make_momentum_copy, momentum_update
from moco_core.queue import KeyQueue


def _embedding_dim(encoder: nn.Module) -> int:
    dim = getattr(encoder, "dim", None)
    if not isinstance(dim, int):
        raise TypeError("the encoder must expose its embedding width as an int attribute 'dim'")
    return dim


def _symmetrize(first: ContrastiveLoss, second: ContrastiveLoss) -> ContrastiveLoss:
    # Summed, as in the official CIFAR-10 demo's symmetric loss.
    return ContrastiveLoss(
        loss=first.loss + second.loss,
        pretext_top1=(first.pretext_top1 + second.pretext_top1) / 2,
        pretext_top5=(first.pretext_top5 + second.pretext_top5) / 2,
    )


class ContrastiveModel(nn.Module):
    """Common interface. ``query_encoder`` is the encoder that SGD trains and that is exported.

    The encoders passed in map images to L2-normalised embeddings and expose their width as
    ``dim`` (:class:`~moco_core.encoders.Encoder` does).

    Shape:
        query_view, key_view: (N, 3, H, W), two augmentations of the same N images;
        sample_indices: (N,) dataset indices (memory bank only).
    """

    query_encoder: nn.Module

    def forward(
        self,
        query_view: torch.Tensor,
        key_view: torch.Tensor,
        *,
        momentum: float = 0.999,
        sample_indices: torch.Tensor | None = None,
    ) -> ContrastiveLoss:
        raise NotImplementedError


class MoCo(ContrastiveModel):
    """Momentum Contrast: keys from a momentum encoder, negatives from a queue of past keys.

    Per step (the official order): momentum-update the key encoder with ``momentum``, encode
    queries, encode keys with shuffled BatchNorm and no gradient, InfoNCE against the queue,
    then enqueue the keys gathered from all ranks.

    Args:
        encoder: the query encoder; the momentum encoder starts as its copy.
        queue_size: K.
        temperature: T (0.07 for v1, 0.2 for v2).
        batchnorm: how keys are shielded from intra-batch statistics (see ``moco_core.batchnorm``).
        symmetric: also use the key view as query (loss_12 + loss_21, both key sets enqueued).
    """

    def __init__(
        self,
        encoder: nn.Module,
        queue_size: int = 65536,
        temperature: float = 0.07,
        batchnorm: BatchNormMode = "shuffle",
        symmetric: bool = False,
    ):
        super().__init__()
        self.query_encoder = encoder
        self.momentum_encoder = make_momentum_copy(encoder)
        self.queue = KeyQueue(queue_size, _embedding_dim(encoder))
        self.temperature = temperature
        self.batchnorm: BatchNormMode = batchnorm
        self.symmetric = symmetric

    def _contrast(
        self, query_images: torch.Tensor, key_images: torch.Tensor, negatives: torch.Tensor
    ) -> tuple[ContrastiveLoss, torch.Tensor]:
        queries = self.query_encoder(query_images)  # N x C
        with torch.no_grad():
            keys = encode_with_shuffled_batch(self.momentum_encoder, key_images, self.batchnorm)  # N x C
        return info_nce(queries, keys, negatives, self.temperature), keys

    def forward(
        self,
        query_view: torch.Tensor,
        key_view: torch.Tensor,
        *,
        momentum: float = 0.999,
        sample_indices: torch.Tensor | None = None,
    ) -> ContrastiveLoss:
        momentum_update(self.query_encoder, self.momentum_encoder, momentum)
        # A copy: the enqueue below writes the buffer in place, and autograd may have saved it.
        negatives = self.queue.keys.clone()  # K x C
        result, keys = self._contrast(query_view, key_view, negatives)
        if self.symmetric:
            reverse, reverse_keys = self._contrast(key_view, query_view, negatives)
            result, keys = _symmetrize(result, reverse), torch.cat([keys, reverse_keys])
        self.queue.enqueue(distributed.all_gather_concat(keys))
        return result


class EndToEnd(ContrastiveModel):
    """Keys from the query encoder itself, with gradients; negatives are the other keys of the
    global batch, so the dictionary size is tied to the batch size.

    Args:
        encoder: the one encoder, used for queries and keys.
        temperature: T.
        batchnorm: key batches are shuffled as in MoCo (the paper uses shuffling BN here too).
        symmetric: also use the key view as query.
    """

    def __init__(
        self,
        encoder: nn.Module,
        temperature: float = 0.07,
        batchnorm: BatchNormMode = "shuffle",
        symmetric: bool = False,
    ):
        super().__init__()
        self.query_encoder = encoder
        self.temperature = temperature
        self.batchnorm: BatchNormMode = batchnorm
        self.symmetric = symmetric

    def _contrast(self, query_images: torch.Tensor, key_images: torch.Tensor) -> ContrastiveLoss:
        queries = self.query_encoder(query_images)  # N x C
        keys = encode_with_shuffled_batch(self.query_encoder, key_images, self.batchnorm, differentiable=True)
        all_keys = distributed.all_gather_concat_with_grad(keys)  # (world*N) x C
        first_positive = distributed.rank() * query_images.shape[0]
        return in_batch_info_nce(queries, all_keys, self.temperature, first_positive)

    def forward(
        self,
        query_view: torch.Tensor,
        key_view: torch.Tensor,
        *,
        momentum: float = 0.999,
        sample_indices: torch.Tensor | None = None,
    ) -> ContrastiveLoss:
        result = self._contrast(query_view, key_view)
        if self.symmetric:
            result = _symmetrize(result, self._contrast(key_view, query_view))
        return result


class MemoryBankModel(ContrastiveModel):
    """Memory bank: the positive key is the bank's row for the same sample, and ``num_negatives``
    negatives are drawn from the bank; the bank row is then refreshed from the new query with
    ``bank_momentum``. Only the query view is encoded, so BatchNorm needs no shuffling.

    Args:
        encoder: the query encoder.
        num_samples: training-set size (rows of the bank).
        num_negatives: K, negatives drawn per step.
        temperature: T.
        bank_momentum: weight of the old row in the refresh (0.5 in Wu et al.).
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_samples: int,
        num_negatives: int = 65536,
        temperature: float = 0.07,
        bank_momentum: float = 0.5,
    ):
        super().__init__()
        self.query_encoder = encoder
        self.memory_bank = MemoryBank(num_samples, _embedding_dim(encoder))
        self.num_negatives = num_negatives
        self.temperature = temperature
        self.bank_momentum = bank_momentum

    def forward(
        self,
        query_view: torch.Tensor,
        key_view: torch.Tensor,
        *,
        momentum: float = 0.999,
        sample_indices: torch.Tensor | None = None,
    ) -> ContrastiveLoss:
        if sample_indices is None:
            raise ValueError("the memory_bank mechanism needs sample_indices (dataset row of each image)")
        self.memory_bank.check_indices(sample_indices)  # before the copy to the device: no host sync there
        sample_indices = sample_indices.to(query_view.device)
        queries = self.query_encoder(query_view)  # N x C
        positives = self.memory_bank.lookup(sample_indices)  # N x C
        negatives = self.memory_bank.sample(self.num_negatives, query_view.device)  # K x C
        result = info_nce(queries, positives, negatives, self.temperature)
        self.memory_bank.update(
            distributed.all_gather_concat(sample_indices),
            distributed.all_gather_concat(queries.detach()),
            self.bank_momentum,
        )
        return result
