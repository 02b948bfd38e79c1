"""``sigmoid``: SigLIP's pairwise sigmoid loss with a learned bias, on every pair of modalities
(or the configured ``pairs``).

For a pair ``(a, b)`` every entry ``(i, j)`` of the ``a``-rows by ``b``-columns logit matrix
``logit_scale * a_i . b_j + logit_bias`` is a binary problem (positive on the diagonal); a row's
loss is the sum of ``-log sigmoid(±logit)`` over its columns and the term is the mean over rows,
which is open_clip's ``SigLipLoss`` (sum over the B x B matrix divided by B). Rows or columns
of samples without both modalities are dropped (the term equals SigLIP on the sub-batch).

Groups (:mod:`mmalign.objectives.positives`): with ``positives: multi`` every same-group entry
is labelled +1; with ``exclude`` same-group entries other than the diagonal are left out of
the row's sum. ``debiased`` is a softmax estimator and is refused here. With
``hard_negatives`` the columns of ``(a, b)`` are every row that has ``b`` (label -1).

With a ``tile`` size the entries are summed in tiles (:func:`mmalign.objectives.tiled.
pair_softplus_sum`): every kept entry as a negative, minus the positives' logits.

Example:
    >>> import torch
    >>> from mmalign.objectives import build_objective
    >>> objective = build_objective({"name": "sigmoid"})
    >>> batch = {m: torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    ...          for m in ("image", "text")}
    >>> out = objective(batch, torch.tensor(10.0), logit_bias=torch.tensor(-10.0))
    >>> out.loss.item() > 0
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.objectives.base import (
    CONFIG_FIELD,
    PairwiseObjective,
    TermLoss,
    register_objective,
)
from mmalign.objectives.distributed import BatchView
from mmalign.objectives.options.pairwise import pair_name
from mmalign.objectives.options.positives import PositivesMode
from mmalign.objectives.options.sigmoid import SigmoidConfig
from mmalign.objectives.positives import group_positive_sums
from mmalign.objectives.tiled import (
    EntryDrop,
    own_dot_products,
    pair_softplus_sum,
    select_rows,
    tile_size,
)


def _tiled_loss_sum(
    batch: BatchView,
    pair: tuple[str, str],
    valid: Tensor,
    scale: Tensor,
    bias: Tensor,
    positives: PositivesMode,
    hard_negatives: bool,
    tile: int,
) -> Tensor:
    """Every kept entry as a negative, ``softplus(z)``, in tiles; then the positives'
    correction: their loss is ``softplus(-z) = softplus(z) - z``, so their ``z`` is subtracted
    (summed per group for ``multi``, without a ``B x B`` mask)."""
    first, second = pair
    rows, queries = select_rows(
        batch.local_global_index(),
        batch.embeddings[first],
        valid[batch.offset : batch.offset + batch.rows],
    )
    columns, keys = select_rows(
        torch.arange(batch.global_rows, device=batch.device),
        batch.global_embeddings[second],
        batch.column(second, global_batch=True) if hard_negatives else valid,
    )
    groups = None if positives == "instance" else batch.global_groups
    drop = None
    if groups is not None and positives == "exclude":
        drop = EntryDrop("same_group", rows, columns, groups[rows], groups[columns])
    total = pair_softplus_sum(queries, keys, scale, bias, drop, tile)
    if groups is not None and positives == "multi":
        sums, counts = group_positive_sums(queries, groups[rows], keys, groups[columns])
        return total - (scale * sums + bias * counts).sum()
    own = own_dot_products(batch.embeddings[first], batch.embeddings[second])
    return total - (scale * own[rows - batch.offset] + bias).sum()


def sigmoid_term(
    batch: BatchView,
    pair: tuple[str, str],
    logit_scale: Tensor,
    logit_bias: Tensor,
    positives: PositivesMode = "instance",
    hard_negatives: bool = False,
    tile: int | None = None,
) -> TermLoss:
    """The sigmoid term of one pair: row losses summed over this rank's valid rows, dense or
    (with ``tile``) in tiles of that many rows and columns."""
    first, second = pair
    valid = batch.column(first, global_batch=True) & batch.column(second, global_batch=True)
    if tile is not None:
        loss_sum = _tiled_loss_sum(
            batch, pair, valid, logit_scale, logit_bias, positives, hard_negatives, tile
        )
        return TermLoss(pair_name(pair), loss_sum, int(valid.sum()))
    valid_local = valid[batch.offset : batch.offset + batch.rows]
    queries = batch.embeddings[first][valid_local]
    logits = (logit_scale * queries) @ batch.global_embeddings[second].T + logit_bias
    positive = batch.local_global_index()[valid_local, None] == torch.arange(
        batch.global_rows, device=batch.device
    )
    kept = (batch.column(second, global_batch=True) if hard_negatives else valid)[None, :]
    if positives != "instance":
        same = batch.same_group()[valid_local]
        if positives == "multi":
            positive = same
        else:
            kept = kept & (positive | ~same)
    signs = positive.to(logits.dtype) * 2 - 1
    entry_loss = -F.logsigmoid(signs * logits)
    if not bool(kept.all()):
        entry_loss = torch.where(kept, entry_loss, 0.0)
    loss_sum = entry_loss.sum()
    return TermLoss(pair_name(pair), loss_sum, int(valid.sum()))


@register_objective("sigmoid")
class SigmoidObjective(PairwiseObjective):
    """SigLIP's sigmoid loss averaged over pairs of modalities."""

    config_class = SigmoidConfig
    config: SigmoidConfig
    learns_bias = True

    def terms(
        self,
        batch: BatchView,
        logit_scale: Tensor,
        logit_bias: Tensor | None,
        generator: torch.Generator | None,
    ) -> list[TermLoss]:
        if logit_bias is None:
            raise ValueError(
                f"{CONFIG_FIELD}.name 'sigmoid' needs a logit_bias (the model's learned bias); "
                "pass logit_bias=Tensor"
            )
        bias = torch.as_tensor(logit_bias, dtype=batch.dtype, device=batch.device)
        config = self.config
        tile = tile_size(config.tile, batch.global_rows, config.gather_with_grad)
        return [
            sigmoid_term(
                batch, pair, logit_scale, bias, config.positives, config.hard_negatives, tile
            )
            for pair in self.pairs(batch.modalities)
        ]
