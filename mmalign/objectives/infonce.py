"""Symmetric InfoNCE between two modalities with missing rows: the core of ``clip`` and
``anchored``.

A row is valid when it has both modalities. Invalid rows are neither positives nor negatives:
they are skipped as rows and their columns are masked out of the softmax, so the term equals
open_clip's ``ClipLoss`` on the sub-batch of valid rows. The per-row loss is the mean of the two
directions' cross-entropies, so the mean over valid rows is ``(CE(a->b) + CE(b->a)) / 2``.
With ``positives`` other than ``instance`` each direction's row loss is
:func:`mmalign.objectives.positives.row_losses` over the same valid columns. With
``hard_negatives`` the columns of direction ``a -> b`` are every row that has ``b`` (mined
negatives are rows with only ``b``); rows are still the valid ones.

With a ``tile`` size both directions come from one tiled pass
(:func:`mmalign.objectives.tiled.pair_logsumexp`): this rank's rows that have ``a`` against
the global rows that have ``b`` (the candidates of both directions), row log-sum-exps for
``a -> b`` and column log-sum-exps (combined over ranks) for ``b -> a``; each rank counts the
columns of its own rows. ``multi``'s positives come from per-group sums of the candidates,
``exclude`` and ``debiased`` drop same-group or own entries inside the tiles.

Example:
    >>> import torch
    >>> from mmalign.objectives.distributed import BatchView
    >>> view = BatchView.gather({"a": torch.eye(2), "b": torch.eye(2)}, present=None)
    >>> term = infonce_term(view, ("a", "b"), torch.tensor(1.0))
    >>> term.valid_rows, round(term.row_loss_sum.item() / 2, 4)
    (2, 0.3133)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.objectives.base import TermLoss
from mmalign.objectives.distributed import BatchView
from mmalign.objectives.options.pairwise import pair_name
from mmalign.objectives.options.positives import PositivesConfig
from mmalign.objectives.positives import (
    debiased_losses,
    group_positive_sums,
    row_losses,
)
from mmalign.objectives.tiled import EntryDrop, own_dot_products, pair_logsumexp, select_rows


def _direction_loss_sum(
    batch: BatchView,
    rows_modality: str,
    columns_modality: str,
    valid: Tensor,
    scale: Tensor,
    positives: PositivesConfig | None,
) -> Tensor:
    """Sum over valid local rows of the cross-entropy of rows against all candidate global
    columns: the valid rows, or with ``hard_negatives`` every row that has the column modality."""
    queries = batch.embeddings[rows_modality]
    keys = batch.global_embeddings[columns_modality]
    labels = batch.local_global_index()
    instance = positives is None or positives.positives == "instance"
    columns = valid
    if positives is not None and positives.hard_negatives:
        columns = batch.column(columns_modality, global_batch=True)
    if instance and bool(valid.all()):
        return F.cross_entropy((scale * queries) @ keys.T, labels, reduction="sum")
    valid_local = valid[batch.offset : batch.offset + batch.rows]
    logits = (scale * queries[valid_local]) @ keys.T
    logits = logits.masked_fill(~columns[None, :], float("-inf"))
    if positives is None or instance:
        return F.cross_entropy(logits, labels[valid_local], reduction="sum")
    same = batch.same_group()[valid_local]
    mode, tau_plus = positives.positives, positives.tau_plus
    return row_losses(logits, labels[valid_local], same, mode, tau_plus, scale).sum()


class _Direction:
    """One direction's valid queries (global indices ``index``, this rank's rows) against the
    candidates (global mask ``candidates``) of the other modality."""

    def __init__(self, batch: BatchView, query: str, key: str, index: Tensor) -> None:
        self.batch, self.query, self.key, self.index = batch, query, key, index

    def losses(
        self,
        lse: Tensor,
        own: Tensor,
        candidates: Tensor,
        scale: Tensor,
        positives: PositivesConfig | None,
    ) -> Tensor:
        """Row losses from the log-sum-exps ``lse`` and every local row's own logit ``own``."""
        batch, local = self.batch, self.index - self.batch.offset
        own = own[local]
        mode = "instance" if positives is None else positives.positives
        if mode == "debiased":
            assert positives is not None
            negatives = int(candidates.sum()) - 1
            return debiased_losses(lse, negatives, own, positives.tau_plus, scale)
        if mode == "multi" and batch.global_groups is not None:
            queries = batch.embeddings[self.query][local]
            keys = batch.global_embeddings[self.key][candidates]
            groups = batch.global_groups
            sums, counts = group_positive_sums(
                queries, groups[self.index], keys, groups[candidates]
            )
            return lse - scale * sums / counts
        return lse - own


def _entry_drop(
    batch: BatchView, positives: PositivesConfig | None, rows: Tensor, columns: Tensor
) -> EntryDrop | None:
    mode = "instance" if positives is None else positives.positives
    if mode == "debiased":
        return EntryDrop("own", rows, columns)
    if mode == "exclude" and batch.global_groups is not None:
        groups = batch.global_groups
        return EntryDrop("same_group", rows, columns, groups[rows], groups[columns])
    return None


def _tiled_loss_sum(
    batch: BatchView,
    pair: tuple[str, str],
    valid: Tensor,
    scale: Tensor,
    positives: PositivesConfig | None,
    tile: int,
) -> Tensor:
    """Both directions' summed row losses from one tiled pass (see the module docstring)."""
    first, second = pair
    has_first, has_second = valid, valid
    if positives is not None and positives.hard_negatives:
        has_first = batch.column(first, global_batch=True)
        has_second = batch.column(second, global_batch=True)
    rows, queries = select_rows(
        batch.local_global_index(),
        batch.embeddings[first],
        has_first[batch.offset : batch.offset + batch.rows],
    )
    columns, keys = select_rows(
        torch.arange(batch.global_rows, device=batch.device),
        batch.global_embeddings[second],
        has_second,
    )
    drop = _entry_drop(batch, positives, rows, columns)
    row_lse, column_lse = pair_logsumexp(queries, keys, scale, drop, tile)
    own = scale * own_dot_products(batch.embeddings[first], batch.embeddings[second])
    owned = valid[columns] & (columns >= batch.offset) & (columns < batch.offset + batch.rows)
    forward = _Direction(batch, first, second, rows[valid[rows]])
    backward = _Direction(batch, second, first, columns[owned])
    loss_sum = forward.losses(row_lse[valid[rows]], own, has_second, scale, positives).sum()
    return loss_sum + backward.losses(column_lse[owned], own, has_first, scale, positives).sum()


def infonce_term(
    batch: BatchView,
    pair: tuple[str, str],
    logit_scale: Tensor,
    positives: PositivesConfig | None = None,
    tile: int | None = None,
) -> TermLoss:
    """The symmetric InfoNCE term of one pair: per-row loss summed over this rank's rows,
    dense or (with ``tile``) in tiles of that many rows and columns."""
    first, second = pair
    valid = batch.column(first, global_batch=True) & batch.column(second, global_batch=True)
    if tile is not None:
        loss_sum = _tiled_loss_sum(batch, pair, valid, logit_scale, positives, tile)
    else:
        loss_sum = _direction_loss_sum(batch, first, second, valid, logit_scale, positives)
        loss_sum = loss_sum + _direction_loss_sum(
            batch, second, first, valid, logit_scale, positives
        )
    return TermLoss(pair_name(pair), loss_sum / 2, int(valid.sum()))
