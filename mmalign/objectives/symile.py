"""``symile``: Symile for any number M >= 2 of modalities (Saporta et al., 2024).

Each modality in turn is the anchor; a row's loss is the cross-entropy of its positive
multilinear inner product ``logit_scale * MIP(anchor_i, others_i...)`` against negatives:

* ``negatives: n`` — as the ``symile`` package's ``compute_logits_n``: column ``j`` holds
  ``MIP(anchor_i, other_1[perm_1[j]], ...)`` with one random permutation of the global batch
  per (anchor, other modality), drawn in anchor order then modality order from ``generator``
  (or torch's default generator) and broadcast from rank 0; the positive replaces the diagonal.
  ``tile`` (``auto`` from 2048 rows) computes it exactly in tiles, never forming the ``B x B``
  logits (:mod:`mmalign.objectives.symile_n`).
* ``negatives: n2`` — every one of the ``B^(M-1)`` combinations of the other modalities' rows,
  computed exactly in blocks (:mod:`mmalign.objectives.symile_n2`); ``block_precision: bf16``
  runs the block matmuls in bfloat16 (the default when ``train.precision`` is ``bf16``).

Missing modalities: an absent embedding is replaced by the all-ones vector (the identity of the
elementwise product) wherever it appears, so MIPs reduce to those of the present modalities.
An anchor row counts when its anchor and at least one other modality are present; terms are
per anchor (``loss/<modality>``, weights keyed by modality) and averaged as described in
:mod:`mmalign.objectives.base`. With M = 2 the loss is CLIP's (``n2``).

Groups (``positives``, :mod:`mmalign.objectives.positives`). ``negatives: n``: a candidate
column is a positive of anchor row ``i`` when every row of its tuple is in ``i``'s group (the
own column always is). A shuffled column that happens to rebuild ``i``'s own tuple is thus a
positive under ``multi``/``exclude`` while ``instance`` (and the ``symile`` package) counts it
as a negative; without ``Batch.groups`` the own column is the only positive.
``negatives: n2``, over all ``B^(M-1)`` candidate tuples, exact: ``multi`` adds ``O(B d M)``
to the blockwise pass (:func:`group_mean_logits`); ``exclude`` runs the pass with the
same-group entries masked (``-inf``, :mod:`mmalign.objectives.symile_n2_blocks`) and adds the
own tuple back, ``logaddexp(lse_i, s_ii) - s_ii``; ``debiased`` masks only each row's own
tuple (groups ``arange(B)``, so it needs no groups) and applies
:func:`~mmalign.objectives.positives.debiased_losses` with ``N = B^(M-1)`` candidates.

Example:
    >>> import torch
    >>> from mmalign.objectives import build_objective
    >>> objective = build_objective({"name": "symile", "negatives": "n2"})
    >>> batch = {m: torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    ...          for m in ("text", "audio", "image")}
    >>> sorted(objective(batch, torch.tensor(10.0)).metrics)
    ['logit_scale', 'loss', 'loss/audio', 'loss/image', 'loss/text']
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mmalign.objectives.base import (
    Objective,
    TermLoss,
    combine_queries,
    register_objective,
)
from mmalign.objectives.distributed import BatchView
from mmalign.objectives.options.symile import SymileConfig
from mmalign.objectives.positives import debiased_losses
from mmalign.objectives.symile_n import n_row_losses
from mmalign.objectives.symile_n2 import symile_logsumexp
from mmalign.objectives.tiled import tile_size


def _identity_for_absent(embeddings: Tensor, present: Tensor) -> Tensor:
    return torch.where(present[:, None], embeddings, torch.ones_like(embeddings))


def _valid_anchor_rows(present: Tensor) -> Tensor:
    """``[rows, M]``: the anchor is present and at least one other modality is."""
    return present & (present.sum(dim=1, keepdim=True) >= 2)


def group_mean_logits(
    batch: BatchView, local: list[Tensor], full: list[Tensor], logit_scale: Tensor
) -> list[Tensor]:
    """``n2`` with ``multi``: for each anchor ``a`` and local row ``i`` the mean logit over the
    candidate tuples whose rows all lie in ``i``'s group, ``scale * sum_d E_a[i, d] *
    prod_{m != a} (mean_{j in group(i)} E_m[j, d])`` (the MIP is multilinear), ``O(B d M)``."""
    groups, inverse = torch.unique(batch.global_groups, return_inverse=True)
    counts = torch.bincount(inverse, minlength=len(groups)).to(full[0].dtype)
    means = [
        embedding.new_zeros(len(groups), embedding.shape[1]).index_add(0, inverse, embedding)
        / counts[:, None]
        for embedding in full
    ]
    own = inverse[batch.offset : batch.offset + batch.rows]
    result = []
    for a in range(len(full)):
        product = logit_scale * local[a]
        for m, mean in enumerate(means):
            if m != a:
                product = product * mean[own]
        result.append(product.sum(dim=-1))
    return result


@register_objective("symile")
class SymileObjective(Objective):
    """Symile's multilinear-inner-product cross-entropy, each modality as anchor in turn."""

    config_class = SymileConfig
    config: SymileConfig
    scores_jointly = True

    def score(
        self,
        query_embeddings: Mapping[str, Tensor],
        candidate_embeddings: Tensor,
        present: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """The multilinear inner product of each candidate with the elementwise product of
        the query modalities, ``sum_d c_d * prod_m q_{m,d}`` (absent entries: all ones).

        Example:
            >>> q = {"a": torch.tensor([[1.0, -1.0]]), "b": torch.tensor([[1.0, -1.0]])}
            >>> SymileObjective(SymileConfig(name="symile")).score(q, torch.eye(2)).tolist()
            [[1.0, 1.0]]
        """
        combined, _ = combine_queries(query_embeddings, present, identity=1.0)
        return combined.prod(dim=0) @ candidate_embeddings.detach().float().cpu().T

    def terms(
        self,
        batch: BatchView,
        logit_scale: Tensor,
        logit_bias: Tensor | None,
        generator: torch.Generator | None,
    ) -> list[TermLoss]:
        local = [
            _identity_for_absent(batch.embeddings[m], batch.present[:, j])
            for j, m in enumerate(batch.modalities)
        ]
        full = [
            _identity_for_absent(batch.global_embeddings[m], batch.global_present[:, j])
            for j, m in enumerate(batch.modalities)
        ]
        positives = logit_scale * torch.stack(local).prod(dim=0).sum(dim=-1)
        if self.config.negatives == "n2":
            losses = self._n2_row_losses(batch, local, full, positives, logit_scale)
        else:
            # the n path reduces over rows only, so tiles need no gradient through the gather
            tile = tile_size(self.config.tile, batch.global_rows)
            config, inputs = self.config, (local, full, positives, logit_scale, generator)
            losses = n_row_losses(batch, *inputs, config, tile)
        valid_global = _valid_anchor_rows(batch.global_present)
        valid_local = valid_global[batch.offset : batch.offset + batch.rows]
        return [
            TermLoss(
                name,
                torch.where(valid_local[:, a], losses[a], 0.0).sum(),
                int(valid_global[:, a].sum()),
            )
            for a, name in enumerate(batch.modalities)
        ]

    def _n2_row_losses(
        self,
        batch: BatchView,
        local: list[Tensor],
        full: list[Tensor],
        positives: Tensor,
        logit_scale: Tensor,
    ) -> list[Tensor]:
        mode, grouped = self.config.positives, batch.groups is not None
        masked = None
        if mode == "exclude" and grouped:
            masked = batch.global_groups
        elif mode == "debiased":
            masked = torch.arange(batch.global_rows, device=batch.device)
        lse = symile_logsumexp(
            logit_scale * full[0],
            full[1:],
            self.config.block_size,
            self.config.block_precision or "fp32",
            groups=masked,
        )
        normalizers = list(lse[:, batch.offset : batch.offset + batch.rows])
        if mode == "multi" and grouped:
            means = group_mean_logits(batch, local, full, logit_scale)
            return [normalizer - mean for normalizer, mean in zip(normalizers, means)]
        if mode == "exclude" and grouped:
            return [torch.logaddexp(lse, positives) - positives for lse in normalizers]
        if mode == "debiased":
            others = batch.global_rows ** (len(full) - 1) - 1
            tau_plus = self.config.tau_plus
            return [
                debiased_losses(lse, others, positives, tau_plus, logit_scale)
                for lse in normalizers
            ]
        return [normalizer - positives for normalizer in normalizers]
