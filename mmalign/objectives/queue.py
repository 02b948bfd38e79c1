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

The queue keeps each entry's group id (``data.group_field``) too, and the main objective's
``positives`` mode applies to the queued columns as to the batch's: under ``exclude`` a queued
entry of the row's group (an earlier copy of the same caption, or of the record itself) leaves
the denominator, under ``multi`` it is a positive. Under ``instance`` (or without groups) every
queued entry is a negative, even an earlier copy of the row's own positive, exactly as a
duplicate inside the batch is.

Example:
    >>> import torch
    >>> queue = EmbeddingQueue(["a", "b"], dim=2, size=3)
    >>> queue.push({"a": torch.ones(2, 2)}); queue.push({"a": torch.zeros(2, 2)})
    >>> queue.stored("a").tolist(), queue.stored("b").shape
    ([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]], torch.Size([0, 2]))
    >>> queue.push({"b": torch.ones(1, 2)}, groups={"b": torch.tensor([7])})
    >>> queue.stored_groups("b").tolist()
    [7]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmalign.objectives.base import TermLoss
from mmalign.objectives.distributed import BatchView
from mmalign.objectives.options.pairwise import pair_name
from mmalign.objectives.options.positives import PositivesConfig
from mmalign.objectives.positives import row_losses


class EmbeddingQueue(nn.Module):
    """The last ``size`` embeddings ``[<= size, dim]`` of each modality and their group ids
    (buffers ``<modality>_embeddings``, ``<modality>_groups`` and ``<modality>_count``, saved
    with the model; the group ids are 0 when the data has no groups)."""

    def __init__(self, modalities: Sequence[str], dim: int, size: int) -> None:
        super().__init__()
        self.modalities = list(modalities)
        self.size = size
        for name in self.modalities:
            self.register_buffer(f"{name}_embeddings", torch.zeros(size, dim))
            self.register_buffer(f"{name}_groups", torch.zeros(size, dtype=torch.long))
            self.register_buffer(f"{name}_count", torch.zeros((), dtype=torch.long))

    def stored(self, modality: str) -> Tensor:
        """The queued embeddings of ``modality``, oldest first."""
        count = int(getattr(self, f"{modality}_count"))
        embeddings: Tensor = getattr(self, f"{modality}_embeddings")
        return embeddings[:count]

    def stored_groups(self, modality: str) -> Tensor:
        """The group ids of :meth:`stored`'s entries."""
        groups: Tensor = getattr(self, f"{modality}_groups")
        return groups[: int(getattr(self, f"{modality}_count"))]

    @torch.no_grad()
    def push(self, rows: Mapping[str, Tensor], groups: Mapping[str, Tensor] | None = None) -> None:
        """Append ``rows[m]`` (``[n, dim]``) and their ``groups[m]`` (``[n]``, 0 without) to
        each modality's queue, dropping the oldest."""
        for name, new in rows.items():
            new_groups = torch.zeros(new.shape[0], dtype=torch.long)
            if groups is not None:
                new_groups = groups[name]
            old_groups = self.stored_groups(name)
            kept_groups = torch.cat([old_groups, new_groups.to(old_groups)])[-self.size :]
            kept = torch.cat([self.stored(name), new.detach().to(self.stored(name))])[-self.size :]
            getattr(self, f"{name}_embeddings")[: kept.shape[0]] = kept
            getattr(self, f"{name}_groups")[: kept.shape[0]] = kept_groups
            getattr(self, f"{name}_count").fill_(kept.shape[0])


def _same_group(batch: BatchView, queue: EmbeddingQueue, columns: str) -> Tensor:
    """``[rows, global_rows + queued]``: which batch and queue columns share each local row's
    group (without groups: the row's own column only)."""
    queued = queue.stored_groups(columns).to(batch.device)
    if batch.groups is None:
        in_queue = torch.zeros(batch.rows, queued.shape[0], dtype=torch.bool, device=batch.device)
    else:
        in_queue = batch.groups[:, None] == queued[None, :]
    return torch.cat([batch.same_group(), in_queue], dim=1)


def _direction_loss_sum(
    batch: BatchView,
    pair: tuple[str, str],
    valid: Tensor,
    scale: Tensor,
    queue: EmbeddingQueue,
    positives: PositivesConfig | None,
) -> Tensor:
    rows, columns = pair
    queued = queue.stored(columns)
    local = valid[batch.offset : batch.offset + batch.rows]
    keys = torch.cat([batch.global_embeddings[columns], queued.to(batch.dtype)])
    logits = (scale * batch.embeddings[rows][local]) @ keys.T
    candidates = torch.cat([valid, valid.new_ones(queued.shape[0])])
    logits = logits.masked_fill(~candidates[None, :], float("-inf"))
    own = batch.local_global_index()[local]
    if positives is None or positives.positives == "instance":
        return F.cross_entropy(logits, own, reduction="sum")
    same = _same_group(batch, queue, columns)[local]
    mode, tau_plus = positives.positives, positives.tau_plus
    return row_losses(logits, own, same, mode, tau_plus, scale).sum()


def queue_term(
    batch: BatchView,
    pair: tuple[str, str],
    logit_scale: Tensor,
    queue: EmbeddingQueue,
    positives: PositivesConfig | None = None,
) -> TermLoss:
    """Symmetric InfoNCE of one pair against the batch and the queue: the per-row loss summed
    over this rank's valid rows, and the global count of valid rows. ``positives`` (the main
    objective's config) says what same-group columns, queued ones included, are."""
    first, second = pair
    valid = batch.column(first, global_batch=True) & batch.column(second, global_batch=True)
    loss_sum = _direction_loss_sum(batch, pair, valid, logit_scale, queue, positives)
    loss_sum = loss_sum + _direction_loss_sum(
        batch, (second, first), valid, logit_scale, queue, positives
    )
    return TermLoss(pair_name(pair), loss_sum / 2, int(valid.sum()))


def present_rows(
    batch: BatchView, modalities: Sequence[str]
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """The detached global rows of each modality that are present, and their group ids
    (``None`` without groups): what a step pushes."""
    masks = {name: batch.column(name, global_batch=True) for name in modalities}
    rows = {name: batch.global_embeddings[name][mask].detach() for name, mask in masks.items()}
    if batch.global_groups is None:
        return rows, None
    return rows, {name: batch.global_groups[mask] for name, mask in masks.items()}
