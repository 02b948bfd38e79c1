"""``two_view``: NT-Xent (SimCLR's normalized-temperature cross-entropy) between two views of
one modality.

The loader gives a modality ``m`` a second view ``m@view2`` (both views augmented, seeded per
record; :mod:`mmalign.data.two_views`). Each of the ``2N`` view embeddings of the global batch
is an anchor whose positive is the other view of its record and whose negatives are the other
``2N - 2`` embeddings; a row without ``m`` is neither anchor nor negative. The per-row loss is
the mean of the row's two anchors' cross-entropies, so the mean over valid rows is SimCLR's
loss averaged over the ``2N`` anchors. Across processes each rank computes its own rows
against the gathered views (:mod:`mmalign.objectives.distributed`).

Example:
    >>> import torch
    >>> from mmalign.objectives.distributed import BatchView
    >>> view = BatchView.gather({"g": torch.eye(3), "g@view2": torch.eye(3)}, present=None)
    >>> term = nt_xent_term(view, "g", "g@view2", temperature=1.0)
    >>> term.valid_rows, round(term.row_loss_sum.item() / 3, 4)
    (3, 0.9048)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmalign.objectives.base import TermLoss
from mmalign.objectives.distributed import BatchView


def nt_xent_term(
    batch: BatchView, first: str, second: str, temperature: float, name: str = "two_view"
) -> TermLoss:
    """NT-Xent between the views ``first`` and ``second``: the per-row loss summed over this
    rank's valid rows, and the global count of valid rows."""
    valid = batch.column(first, global_batch=True) & batch.column(second, global_batch=True)
    rows = batch.local_global_index()[valid[batch.offset : batch.offset + batch.rows]]
    local = valid[batch.offset : batch.offset + batch.rows]
    queries = torch.cat([batch.embeddings[first][local], batch.embeddings[second][local]])
    keys = torch.cat([batch.global_embeddings[first], batch.global_embeddings[second]])
    logits = (queries @ keys.T) / temperature
    total = batch.global_rows
    own = torch.cat([rows, rows + total])
    positive = torch.cat([rows + total, rows])
    excluded = ~torch.cat([valid, valid])[None, :].expand_as(logits).clone()
    excluded[torch.arange(own.numel(), device=own.device), own] = True
    logits = logits.masked_fill(excluded, float("-inf"))
    loss_sum = F.cross_entropy(logits, positive, reduction="sum") / 2
    return TermLoss(name, loss_sum, int(valid.sum()))
