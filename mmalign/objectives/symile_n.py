"""Symile ``negatives: n``: each anchor row against ``B`` shuffled tuples, dense or in tiles.

For anchor ``a`` column ``j`` is the tuple ``(other_m[perm_m[j]])_{m != a}`` of the global
batch (:func:`draw_permutations`, one permutation per (anchor, other modality)); its logit
for local row ``i`` is ``scale * anchor_i . prod_m other_m[perm_m[j]]`` (the MIP is
multilinear, so the elementwise product of the tuple is the matmul's operand,
:func:`shuffled_tuples`), and the own column ``j = i`` holds the positive ``scale *
MIP(i's own tuple)`` instead. The dense path builds these ``R x B`` logits per anchor.

With a ``tile`` size the row log-sum-exps come from
:func:`mmalign.objectives.tiled.pair_logsumexp` of the anchor rows against the shuffled
tuples (``O(B d + tile^2)`` memory, the backward recomputing each tile): the own column is
dropped inside the tiles and the positive added back, ``logaddexp(lse_i, s_ii)``.
``exclude`` also drops the columns whose tuple lies in row ``i``'s group (each column's tuple
gets the group all its rows share, or none, :func:`tuple_groups`); ``multi``'s positive
logits are summed per group (:func:`~mmalign.objectives.positives.group_positive_sums`);
``debiased`` uses the own-dropped log-sum-exp with ``B - 1`` negatives. Only the row
direction is used, so the gradient reaches the shuffled tuples (and through the gather their
owners) exactly as the dense path's does, with or without ``gather_with_grad``.

Example:
    >>> generator = torch.Generator().manual_seed(0)
    >>> full = [torch.nn.functional.normalize(torch.randn(6, 4, generator=generator), dim=-1)
    ...         for _ in range(3)]
    >>> perms = draw_permutations(3, 6, torch.Generator().manual_seed(1), full[0].device)
    >>> shuffled_tuples(full, perms, anchor=0).shape
    torch.Size([6, 4])
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmalign.objectives.distributed import BatchView, broadcast_from_first
from mmalign.objectives.options.positives import PositivesConfig
from mmalign.objectives.positives import (
    debiased_losses,
    group_positive_sums,
    row_losses,
)
from mmalign.objectives.tiled import EntryDrop, own_dot_products, pair_logsumexp


def draw_permutations(
    modalities: int, rows: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """``[M, M - 1, rows]`` permutations for ``n`` negatives, identical on every rank."""
    generator_device = generator.device if generator is not None else "cpu"
    perms = [
        torch.randperm(rows, generator=generator, device=generator_device)
        for _ in range(modalities * (modalities - 1))
    ]
    stacked = torch.stack(perms).reshape(modalities, modalities - 1, rows).to(device)
    return broadcast_from_first(stacked)


def shuffled_tuples(full: list[Tensor], perms: Tensor, anchor: int) -> Tensor:
    """``[B, d]``: row ``j`` is the elementwise product of the other modalities' rows
    ``perms[anchor][k][j]`` (the ``k``-th modality other than ``anchor``)."""
    others = [full[m] for m in range(len(full)) if m != anchor]
    return torch.stack([o[p] for o, p in zip(others, perms[anchor])]).prod(dim=0)


def tuple_groups(groups: Tensor, perms: Tensor) -> Tensor:
    """``[B]``: the group every row of column ``j``'s tuple shares (``groups`` are
    non-negative ids), ``-1`` where they differ.

    Example:
        >>> tuple_groups(torch.tensor([0, 0, 1]), torch.tensor([[0, 1, 2], [1, 2, 2]])).tolist()
        [0, -1, 1]
    """
    first = groups[perms[0]]
    agree = torch.stack([groups[p] == first for p in perms]).all(dim=0)
    return torch.where(agree, first, -1)


def n_row_losses(
    batch: BatchView,
    local: list[Tensor],
    full: list[Tensor],
    positives: Tensor,
    logit_scale: Tensor,
    generator: torch.Generator | None,
    config: PositivesConfig,
    tile: int | None,
) -> list[Tensor]:
    """Per anchor, the row losses ``[R]`` of this rank's rows (absent entries already the
    all-ones vector in ``local``/``full``; ``positives`` the own tuples' logits), dense or
    (with ``tile``) in tiles of that many rows and columns."""
    perms = draw_permutations(len(full), batch.global_rows, generator, batch.device)
    losses = []
    for anchor in range(len(full)):
        shuffled = shuffled_tuples(full, perms, anchor)
        inputs = (batch, local[anchor], shuffled, perms[anchor], positives, logit_scale, config)
        losses.append(_dense_losses(*inputs) if tile is None else _tiled_losses(*inputs, tile))
    return losses


def _dense_losses(
    batch: BatchView,
    anchor: Tensor,
    shuffled: Tensor,
    perms: Tensor,
    positives: Tensor,
    logit_scale: Tensor,
    config: PositivesConfig,
) -> Tensor:
    """The ``R x B`` logits with the positives on the own columns, then their row losses."""
    own = batch.local_global_index()
    own_column = own[:, None] == torch.arange(batch.global_rows, device=batch.device)
    logits = (logit_scale * anchor) @ shuffled.T
    logits = torch.where(own_column, positives[:, None], logits)
    if config.positives == "instance":
        return logits.logsumexp(dim=1) - positives
    positive = own_column
    if batch.groups is not None:
        same = batch.same_group()
        positive = own_column | torch.stack([same[:, p] for p in perms]).all(dim=0)
    return row_losses(logits, own, positive, config.positives, config.tau_plus, logit_scale)


def _tiled_losses(
    batch: BatchView,
    anchor: Tensor,
    shuffled: Tensor,
    perms: Tensor,
    positives: Tensor,
    logit_scale: Tensor,
    config: PositivesConfig,
    tile: int,
) -> Tensor:
    """The same row losses from the tiled log-sum-exps (see the module docstring)."""
    own = batch.local_global_index()
    columns = torch.arange(batch.global_rows, device=batch.device)
    mode, groups = config.positives, batch.global_groups
    own_only = EntryDrop("own", own, columns)
    if groups is None or mode not in ("multi", "exclude"):  # one positive: the own column
        lse = pair_logsumexp(anchor, shuffled, logit_scale, own_only, tile)[0]
        if mode == "debiased":
            negatives = batch.global_rows - 1
            return debiased_losses(lse, negatives, positives, config.tau_plus, logit_scale)
        return torch.logaddexp(lse, positives) - positives
    ids = torch.unique(groups, return_inverse=True)[1]  # non-negative: -1 marks no group
    row_groups, column_groups = ids[own], tuple_groups(ids, perms)
    drop = own_only
    if mode == "exclude":
        drop = EntryDrop("same_group_and_own", own, columns, row_groups, column_groups)
    lse = pair_logsumexp(anchor, shuffled, logit_scale, drop, tile)[0]
    lse = torch.logaddexp(lse, positives)
    if mode == "exclude":
        return lse - positives
    groups_of = (own, row_groups, column_groups)
    return lse - _positive_mean(anchor, shuffled, *groups_of, positives, logit_scale)


def _positive_mean(
    anchor: Tensor,
    shuffled: Tensor,
    own: Tensor,
    row_groups: Tensor,
    column_groups: Tensor,
    positives: Tensor,
    logit_scale: Tensor,
) -> Tensor:
    """``multi``: the mean logit over each row's positives, its own column (the positive
    logit) and the other columns whose tuple lies in its group, in ``O(B d)``."""
    sums, counts = group_positive_sums(anchor, row_groups, shuffled, column_groups)
    own_in_group = column_groups[own] == row_groups  # counted above with the shuffled logit
    own_shuffled = own_dot_products(anchor, shuffled[own])
    sums = sums - torch.where(own_in_group, own_shuffled, 0.0)
    counts = counts - own_in_group.to(counts.dtype)
    return (positives + logit_scale * sums) / (1 + counts)
