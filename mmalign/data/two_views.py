"""Two augmented views of one modality per record, for the ``two_view`` term.

With ``model.objective.terms: [{type: two_view, modality: graph}]`` the training loader gives
``graph`` a second view, ``graph@view2``: a column of the batch of its own (present where
``graph`` is), encoded by ``graph``'s tower. Both views are the tower's train-time augmentation
(``preprocess(raw, augment=True)``: GraphCL's node dropping, edge perturbation, attribute
masking and subgraphs for ``graph``, open_clip's crop and colour settings for ``image``...),
each drawn under its own seed, a stable hash of ``data.seed``, the epoch, the record's key,
the modality and the view. The views are therefore the same in every worker layout, process
count and resumed run (the record decides them, not the order of the stream).

Example:
    >>> import torch
    >>> class Noisy:
    ...     def preprocess(self, raw, augment=False):
    ...         return raw + torch.rand(()) if augment else raw
    >>> first = augmented_views(Noisy(), torch.tensor(0.0), "k", "m", seed=1, epoch=0)
    >>> second = augmented_views(Noisy(), torch.tensor(0.0), "k", "m", seed=1, epoch=0)
    >>> first == second, bool(first[0] != first[1])
    (True, True)
"""

from __future__ import annotations

from typing import Any

import torch

from mmalign.data.samples import Tower
from mmalign.data.views import stable_hash


def augmented_views(
    tower: Tower, raw: Any, key: str, modality: str, seed: int, epoch: int
) -> tuple[Any, Any]:
    """Two train-time augmentations of ``raw``, each under its own stable seed (the global
    RNG is left as it was)."""
    views = []
    for view in (1, 2):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stable_hash(f"{seed}:{epoch}:{key}:{modality}:{view}") % 2**63)
            views.append(tower.preprocess(raw, augment=True))
    return views[0], views[1]
