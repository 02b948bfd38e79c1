"""Beyond one positive per row: which candidates count as positives (``model.objective.positives``).

With ``s_ik`` the logit of query ``i`` against candidate ``k`` (``-inf`` for a candidate that
is not valid) and ``P_i`` the valid candidates in ``i``'s group (``i``'s own column included):

* ``instance`` (default): ``i``'s own column is its only positive (InfoNCE as it always was).
* ``multi``: ``loss_i = -(1/|P_i|) sum_{p in P_i} log(exp(s_ip) / sum_k exp(s_ik))``
  (SupCon / Poly-View / RobustCLAP paraphrases).
* ``exclude``: same-group candidates leave the denominator, the positive stays ``i``'s own:
  ``loss_i = -log(exp(s_ii) / (exp(s_ii) + sum_{k not in P_i} exp(s_ik)))``.
* ``debiased`` (Chuang et al. 2020, no groups needed; ``tau_plus`` in [0, 1)):
  ``g_i = max((mean_{k != i} exp(s_ik) - tau_plus exp(s_ii)) / (1 - tau_plus), exp(-scale))``
  and ``loss_i = -log(exp(s_ii) / (exp(s_ii) + (N_i - 1) g_i))`` with ``N_i`` valid candidates
  (:func:`debiased_losses`, shared with Symile ``n2``, which has no logits matrix).

Groups come from ``Batch.groups`` (``data.group_field``); without groups every row is its own
group, so ``multi`` and ``exclude`` equal ``instance``.

Example:
    >>> import torch
    >>> logits = torch.tensor([[2.0, 2.0, 0.0]])
    >>> own, same = torch.tensor([0]), torch.tensor([[True, True, False]])
    >>> round(float(row_losses(logits, own, same, "exclude", 0.0, 1.0)[0]), 4)
    0.1269
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmalign.objectives.options.positives import PositivesMode


def same_group(row_groups: Tensor, column_groups: Tensor) -> Tensor:
    """``BoolTensor[R, C]``: whether row ``r`` and column ``c`` share a group.

    Example:
        >>> same_group(torch.tensor([1, 2]), torch.tensor([1, 1, 2])).tolist()
        [[True, True, False], [False, False, True]]
    """
    return row_groups[:, None] == column_groups[None, :]


def rows_without_negatives(groups: Tensor | None) -> int:
    """How many rows share their group with every row of the batch: under ``exclude`` such a
    row has no negative left and its loss is exactly 0.

    Example:
        >>> rows_without_negatives(torch.tensor([3, 3, 3])), rows_without_negatives(None)
        (3, 0)
        >>> rows_without_negatives(torch.tensor([1, 1, 2]))
        0
    """
    if groups is None:
        return 0
    return int(same_group(groups, groups).all(dim=1).sum())


def _own_mask(logits: Tensor, own: Tensor) -> Tensor:
    columns = torch.arange(logits.shape[1], device=logits.device)
    return columns[None, :] == own[:, None]


def row_losses(
    logits: Tensor,
    own: Tensor,
    positive: Tensor,
    mode: PositivesMode,
    tau_plus: float,
    logit_scale: Tensor | float,
) -> Tensor:
    """Per-row losses ``[R]`` of ``logits`` ``[R, C]`` (``-inf`` marks invalid candidates).

    ``own`` ``[R]`` is each row's own column (always a valid positive), ``positive``
    ``[R, C]`` the same-group mask (it may include invalid columns; they are ignored).
    """
    own_column = _own_mask(logits, own)
    own_logit = logits.gather(1, own[:, None]).squeeze(1)
    if mode == "instance":
        return logits.logsumexp(dim=1) - own_logit
    valid = torch.isfinite(logits)
    if mode == "multi":
        positive = (positive & valid) | own_column
        positive_sum = torch.where(positive, logits, 0.0).sum(dim=1)
        return logits.logsumexp(dim=1) - positive_sum / positive.sum(dim=1)
    if mode == "exclude":
        dropped = positive & ~own_column
        return logits.masked_fill(dropped, float("-inf")).logsumexp(dim=1) - own_logit
    if mode == "debiased":
        negatives = torch.where(valid & ~own_column, logits, float("-inf")).logsumexp(dim=1)
        counts = valid.sum(dim=1) - 1
        return debiased_losses(negatives, counts, own_logit, tau_plus, logit_scale)
    raise ValueError(f"unknown positives mode {mode!r}; use instance, multi, exclude, debiased")


def group_positive_sums(
    queries: Tensor, query_groups: Tensor, keys: Tensor, key_groups: Tensor
) -> tuple[Tensor, Tensor]:
    """For each query ``i``: ``sum_{k in group(i)} queries_i . keys_k`` and the number of such
    keys, in ``O((Q + K) d)`` from per-group sums of ``keys`` (no ``Q x K`` mask); the tiled
    losses use it for ``multi``'s positives.

    Example:
        >>> keys = torch.tensor([[1.0], [2.0], [4.0]])
        >>> sums, counts = group_positive_sums(torch.ones(2, 1), torch.tensor([7, 9]),
        ...                                    keys, torch.tensor([7, 7, 9]))
        >>> sums.tolist(), counts.tolist()
        ([3.0, 4.0], [2, 1])
    """
    ids, inverse = torch.unique(torch.cat([query_groups, key_groups]), return_inverse=True)
    query_bins, key_bins = inverse[: len(query_groups)], inverse[len(query_groups) :]
    key_sums = keys.new_zeros(len(ids), keys.shape[1]).index_add(0, key_bins, keys)
    counts = torch.bincount(key_bins, minlength=len(ids))
    return (queries * key_sums[query_bins]).sum(dim=1), counts[query_bins]


def debiased_losses(
    log_negatives: Tensor,
    negatives: Tensor | int,
    own_logit: Tensor,
    tau_plus: float,
    logit_scale: Tensor | float,
) -> Tensor:
    """Chuang et al.'s estimator from each row's ``log(sum_{k != i} exp(s_ik))`` and count of
    candidates ``k != i`` (``N_i - 1``), every exponential shifted by ``max(own, that log)``.

    Example:
        >>> loss = debiased_losses(torch.tensor([1.0]), 3, torch.tensor([2.0]), 0.0, 1.0)
        >>> torch.allclose(loss, torch.logaddexp(torch.tensor(2.0), torch.tensor(1.0)) - 2)
        True
    """
    shift = torch.maximum(log_negatives, own_logit).detach()
    count = torch.as_tensor(negatives, dtype=own_logit.dtype, device=own_logit.device)
    mean = torch.exp(log_negatives - shift) / count.clamp(min=1)
    own = own_logit - shift
    log_floor = -torch.as_tensor(logit_scale, dtype=own_logit.dtype) - shift
    estimate = (mean - tau_plus * torch.exp(own)) / (1.0 - tau_plus)
    tiny = torch.finfo(own_logit.dtype).tiny
    log_estimate = torch.where(
        estimate > torch.exp(log_floor), torch.log(estimate.clamp(min=tiny)), log_floor
    )
    return torch.logaddexp(own, torch.log(count) + log_estimate) - own
