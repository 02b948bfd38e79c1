"""``clip``: symmetric InfoNCE on every pair of modalities (or the configured ``pairs``).

With two modalities this is open_clip's ``ClipLoss``; with more, the weighted mean of the pair
terms (``weights`` keyed ``"a-b"``). See :mod:`mmalign.objectives.base` for the averaging rule,
:mod:`mmalign.objectives.infonce` for missing modalities and
:mod:`mmalign.objectives.positives` for same-group positives (``positives``, ``tau_plus``).

Example:
    >>> import torch
    >>> from mmalign.objectives import build_objective
    >>> objective = build_objective({"name": "clip", "pairs": [["image", "text"]]})
    >>> batch = {m: torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    ...          for m in ("image", "text", "audio")}
    >>> sorted(objective(batch, torch.tensor(10.0)).metrics)
    ['logit_scale', 'loss', 'loss/image-text']
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmalign.objectives.base import PairwiseObjective, TermLoss, register_objective
from mmalign.objectives.distributed import BatchView
from mmalign.objectives.infonce import infonce_term
from mmalign.objectives.tiled import tile_size


@register_objective("clip")
class ClipObjective(PairwiseObjective):
    """Symmetric InfoNCE averaged over pairs of modalities."""

    def terms(
        self,
        batch: BatchView,
        logit_scale: Tensor,
        logit_bias: Tensor | None,
        generator: torch.Generator | None,
    ) -> list[TermLoss]:
        tile = tile_size(self.config.tile, batch.global_rows, self.config.gather_with_grad)
        return [
            infonce_term(batch, pair, logit_scale, self.config, tile)
            for pair in self.pairs(batch.modalities)
        ]
