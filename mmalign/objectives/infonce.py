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

Example:
    >>> import torch
    >>> from mmalign.objectives.distributed import BatchView
    >>> view = BatchView.gather({"a": torch.eye(2), "b": torch.eye(2)}, present=None)
    >>> term = infonce_term(view, ("a", "b"), torch.tensor(1.0))
    >>> term.valid_rows, round(term.row_loss_sum.item() / 2, 4)
    (2, 0.3133)
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from mmalign.objectives.base import TermLoss, pair_name
from mmalign.objectives.distributed import BatchView
from mmalign.objectives.positives import PositivesConfig, row_losses


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


def infonce_term(
    batch: BatchView,
    pair: tuple[str, str],
    logit_scale: Tensor,
    positives: PositivesConfig | None = None,
) -> TermLoss:
    """The symmetric InfoNCE term of one pair: per-row loss summed over this rank's rows."""
    first, second = pair
    valid = batch.column(first, global_batch=True) & batch.column(second, global_batch=True)
    loss_sum = _direction_loss_sum(batch, first, second, valid, logit_scale, positives)
    loss_sum = loss_sum + _direction_loss_sum(batch, second, first, valid, logit_scale, positives)
    return TermLoss(pair_name(pair), loss_sum / 2, int(valid.sum()))
