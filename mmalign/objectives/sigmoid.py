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
from pydantic import model_validator
from torch import Tensor

from mmalign.config import field_error
from mmalign.objectives.base import (
    CONFIG_FIELD,
    PairwiseConfig,
    PairwiseObjective,
    TermLoss,
    pair_name,
    register_objective,
)
from mmalign.objectives.distributed import BatchView
from mmalign.objectives.positives import PositivesMode


class SigmoidConfig(PairwiseConfig):
    """``sigmoid``: the pairwise config; ``positives`` is ``instance``, ``multi`` or ``exclude``."""

    @model_validator(mode="after")
    def _binary_positives(self) -> SigmoidConfig:
        if self.positives == "debiased":
            raise field_error(
                type(self).__name__,
                "positives",
                "'debiased' corrects a softmax denominator and 'sigmoid' has none; use "
                "instance, multi or exclude",
                self.positives,
            )
        return self


def sigmoid_term(
    batch: BatchView,
    pair: tuple[str, str],
    logit_scale: Tensor,
    logit_bias: Tensor,
    positives: PositivesMode = "instance",
    hard_negatives: bool = False,
) -> TermLoss:
    """The sigmoid term of one pair: row losses summed over this rank's valid rows."""
    first, second = pair
    valid = batch.column(first, global_batch=True) & batch.column(second, global_batch=True)
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
        return [
            sigmoid_term(
                batch, pair, logit_scale, bias, self.config.positives, self.config.hard_negatives
            )
            for pair in self.pairs(batch.modalities)
        ]
