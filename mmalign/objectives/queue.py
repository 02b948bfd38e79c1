"""The ``queue`` term: past embeddings as extra negatives (MoCo, ALBEF, pytorch-metric-learning's
``CrossBatchMemory``).

:class:`EmbeddingQueue` keeps, per modality, the last ``size`` embeddings of the *global* batch
(gathered over processes, present rows only), oldest first, as buffers of the model: a
checkpoint carries them, so a resumed run continues with the same queue (exact resume). The
queue changes only in :meth:`EmbeddingQueue.push`, which the trainer calls once per optimizer
step after the update (:meth:`mmalign.objectives.terms.TermsObjective.end_step`), so every
loss evaluation of an accumulated step sees the same queue.

For a pair ``(a, b)``, direction ``a -> b`` is the cross-entropy of each valid row of ``a``
against the valid rows of ``b`` in the global batch followed by the queued ``b`` embeddings
(positive: its own row); the per-row loss is the mean of both directions, as in
:mod:`mmalign.objectives.infonce`. Queued embeddings carry no gradient and were encoded by the
parameters of earlier steps (their staleness is the price of their cost: nothing is
re-encoded).

Example:
    >>> import torch
    >>> queue = EmbeddingQueue(["a", "b"], dim=2, size=3)
    >>> queue.push({"a": torch.ones(2, 2)}); queue.push({"a": torch.zeros(2, 2)})
    >>> queue.stored("a").tolist(), queue.stored("b").shape
    ([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]], torch.Size([0, 2]))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmalign.objectives.base import TermLoss, pair_name
from mmalign.objectives.distributed import BatchView


class EmbeddingQueue(nn.Module):
    """The last ``size`` embeddings ``[<= size, dim]`` of each modality (buffers
    ``<modality>_embeddings`` and ``<modality>_count``, saved with the model)."""

    def __init__(self, modalities: Sequence[str], dim: int, size: int) -> None:
        super().__init__()
        self.modalities = list(modalities)
        self.size = size
        for name in self.modalities:
            self.register_buffer(f"{name}_embeddings", torch.zeros(size, dim))
            self.register_buffer(f"{name}_count", torch.zeros((), dtype=torch.long))

    def stored(self, modality: str) -> Tensor:
        """The queued embeddings of ``modality``, oldest first."""
        count = int(getattr(self, f"{modality}_count"))
        embeddings: Tensor = getattr(self, f"{modality}_embeddings")
        return embeddings[:count]

    @torch.no_grad()
    def push(self, rows: Mapping[str, Tensor]) -> None:
        """Append ``rows[m]`` (``[n, dim]``) to each modality's queue, dropping the oldest."""
        for name, new in rows.items():
            kept = torch.cat([self.stored(name), new.detach().to(self.stored(name))])[-self.size :]
            getattr(self, f"{name}_embeddings")[: kept.shape[0]] = kept
            getattr(self, f"{name}_count").fill_(kept.shape[0])


def _direction_loss_sum(
    batch: BatchView, rows: str, columns: str, valid: Tensor, scale: Tensor, queued: Tensor
) -> Tensor:
    local = valid[batch.offset : batch.offset + batch.rows]
    keys = torch.cat([batch.global_embeddings[columns], queued.to(batch.dtype)])
    logits = (scale * batch.embeddings[rows][local]) @ keys.T
    candidates = torch.cat([valid, valid.new_ones(queued.shape[0])])
    logits = logits.masked_fill(~candidates[None, :], float("-inf"))
    return F.cross_entropy(logits, batch.local_global_index()[local], reduction="sum")


def queue_term(
    batch: BatchView, pair: tuple[str, str], logit_scale: Tensor, queue: EmbeddingQueue
) -> TermLoss:
    """Symmetric InfoNCE of one pair against the batch and the queue: the per-row loss summed
    over this rank's valid rows, and the global count of valid rows."""
    first, second = pair
    valid = batch.column(first, global_batch=True) & batch.column(second, global_batch=True)
    loss_sum = _direction_loss_sum(batch, first, second, valid, logit_scale, queue.stored(second))
    loss_sum = loss_sum + _direction_loss_sum(
        batch, second, first, valid, logit_scale, queue.stored(first)
    )
    return TermLoss(pair_name(pair), loss_sum / 2, int(valid.sum()))


def present_rows(batch: BatchView, modalities: Sequence[str]) -> dict[str, Tensor]:
    """The detached global rows of each modality that are present: what a step pushes."""
    return {
        name: batch.global_embeddings[name][batch.column(name, global_batch=True)].detach()
        for name in modalities
    }
