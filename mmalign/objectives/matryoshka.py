"""Matryoshka embeddings (MRL): one objective trained on every nested prefix of the embedding.

With ``model.matryoshka: [16, 32, 64, 128]`` the model's objective is applied to the first
``d`` coordinates of every embedding, renormalized, for each listed ``d``, and the losses are
combined by ``model.matryoshka_weights`` (default 1 each, as in the MRL paper):

    loss = sum_d w_d * objective({m: normalize(e_m[:, :d])})

Renormalizing the prefix of a normalized embedding equals normalizing the prefix of the
projection's output, so each prefix is itself a cosine embedding. Every objective works
unchanged: presence masks (absent rows stay zero), the all-gather across processes (one per
prefix), exact accumulation (the wrapper is the model's objective, so the cached and spliced
embeddings go through it) and Symile ``n2`` (one blockwise pass per prefix: the cost is the
sum of the prefix sizes over ``dim``, e.g. ``(8+16+32+64+128)/128 = 1.9`` times the plain
loss). A truncated embedding (:func:`mmalign.embeddings.truncate`) is what a prefix was trained
as.

Example:
    >>> import torch
    >>> from mmalign.objectives import build_objective
    >>> objective = MatryoshkaObjective(build_objective({"name": "clip"}), [2, 4])
    >>> embeddings = {"a": torch.eye(4), "b": torch.eye(4)}
    >>> out = objective(embeddings, logit_scale=torch.tensor(10.0))
    >>> sorted(key for key in out.metrics if key.startswith("loss/dim"))
    ['loss/dim2', 'loss/dim4']
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mmalign.embeddings import truncate
from mmalign.objectives.base import LossOutput, Objective, WrappingObjective


class MatryoshkaObjective(WrappingObjective):
    """Apply ``inner`` to each renormalized prefix ``dims`` and sum the losses by ``weights``.

    It scores, learns a bias and scores jointly exactly as ``inner`` (at the full size of the
    embeddings it is given). Metrics: ``loss`` (the weighted sum), ``loss/dim{d}`` per prefix,
    and the other metrics of ``inner`` at the largest prefix.

    Example:
        >>> from mmalign.objectives import build_objective
        >>> MatryoshkaObjective(build_objective({"name": "symile"}), [8, 16]).scores_jointly
        True
    """

    def __init__(
        self, inner: Objective, dims: Sequence[int], weights: Sequence[float] | None = None
    ) -> None:
        super().__init__(inner)
        self.dims = [int(dim) for dim in dims]
        self.weights = [1.0] * len(self.dims) if weights is None else [float(w) for w in weights]
        if not self.dims or len(self.weights) != len(self.dims):
            raise ValueError(f"{len(self.weights)} matryoshka weights for {len(self.dims)} dims")

    def forward(
        self,
        embeddings: dict[str, Tensor],
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
        present: Tensor | None = None,
        generator: torch.Generator | None = None,
        groups: Tensor | None = None,
    ) -> LossOutput:
        """The weighted sum of the inner loss on every renormalized prefix (``groups`` as the
        inner objective takes them)."""
        width = next(iter(embeddings.values())).shape[-1]
        if self.dims[-1] > width:
            raise ValueError(
                f"matryoshka prefix {self.dims[-1]} exceeds the embeddings' dim {width}"
            )
        loss: Tensor | None = None
        metrics: dict[str, float] = {}
        for dim, weight in zip(self.dims, self.weights, strict=True):
            prefixes = {name: truncate(value, dim) for name, value in embeddings.items()}
            out = self.inner(prefixes, logit_scale, logit_bias, present, generator, groups=groups)
            loss = out.loss * weight if loss is None else loss + out.loss * weight
            metrics[f"loss/dim{dim}"] = out.metrics["loss"]
            last = out.metrics
        total = sum(metrics[f"loss/dim{dim}"] * w for dim, w in zip(self.dims, self.weights))
        assert loss is not None  # the constructor refuses an empty list of dims
        return LossOutput(loss=loss, metrics={**last, **metrics, "loss": total})


def with_matryoshka(
    objective: Objective, dims: Sequence[int] | None, weights: Sequence[float] | None = None
) -> Objective:
    """``objective`` wrapped for the Matryoshka ``dims`` (unchanged when ``dims`` is empty).

    Example:
        >>> from mmalign.objectives import build_objective
        >>> type(with_matryoshka(build_objective({"name": "clip"}), None)).__name__
        'ClipObjective'
    """
    if not dims:
        return objective
    return MatryoshkaObjective(objective, dims, weights)
