"""The global batch across processes: all-gather with gradient and each rank's row offset.

With ``torch.distributed`` initialized and more than one process, every objective sees the
embeddings of all processes (gathered with gradient through
``torch.distributed.nn.functional.all_gather``, whose backward sums the gradients of every
rank into the owner of the rows) and computes the loss of its *local* rows against that
global batch. The objectives scale each rank's loss by the world size over the global row
count, so that DDP's gradient averaging yields exactly the loss and gradients of one process
holding the whole batch. Ranks may hold different numbers of rows (they are padded for the
collective and unpadded after).

Example:
    >>> import torch
    >>> view = BatchView.gather({"a": torch.zeros(4, 2)}, present=None)
    >>> view.world_size, view.offset, view.global_embeddings["a"].shape
    (1, 0, torch.Size([4, 2]))
"""

from __future__ import annotations

import functools
import operator
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor

from mmalign.dist import rank, world_size


def _row_counts(rows: int, device: torch.device) -> list[int]:
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([rows], dtype=torch.long, device=device))
    return [int(count) for count in counts]


def _pad_rows(tensor: Tensor, rows: int) -> Tensor:
    if tensor.shape[0] == rows:
        return tensor
    padding = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, padding])


def all_gather_rows(tensor: Tensor, counts: list[int], with_grad: bool = True) -> Tensor:
    """Concatenate every rank's rows (rank order). ``with_grad=False`` keeps the gradient only
    for this rank's own rows, as open_clip does without ``gather_with_grad``."""
    padded = _pad_rows(tensor, max(counts))
    if with_grad and tensor.requires_grad:
        with warnings.catch_warnings():
            # torch deprecates this gather in favour of _functional_collectives, whose gather
            # has no backward; this one is still torch's differentiable gather (the DDP/FSDP
            # equality tests hold its gradients), so the notice is noise printed every step
            warnings.filterwarnings(
                "ignore",
                message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
                category=FutureWarning,
            )
            parts = list(dist_fn.all_gather(padded))
    else:
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.detach().contiguous())
        parts[rank()] = padded
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def broadcast_from_first(tensor: Tensor) -> Tensor:
    """Rank 0's value of ``tensor`` on every rank (no-op in one process)."""
    if world_size() > 1:
        tensor = tensor.contiguous()
        dist.broadcast(tensor, src=0)
    return tensor


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """The mean over ranks of a detached tensor (identity in one process)."""
    if world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= world_size()
    return tensor


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum over ranks of a detached tensor (identity in one process)."""
    if world_size() > 1:
        tensor = tensor.clone().contiguous()
        dist.all_reduce(tensor)
    return tensor


def all_reduce_logsumexp(partial: Tensor) -> Tensor:
    """``log(sum over ranks of exp(partial))`` elementwise: combines log-sum-exps that each
    rank computed over its own rows (identity in one process; no gradient). Gathering the
    partial values and reducing them with ``logsumexp`` is the all-reduce of (max, sum of
    exponentials) pairs in one collective, and exact for ``-inf`` entries.

    Example:
        >>> all_reduce_logsumexp(torch.tensor([0.0, float("-inf")])).tolist()
        [0.0, -inf]
    """
    if world_size() == 1:
        return partial
    parts = [torch.empty_like(partial) for _ in range(world_size())]
    dist.all_gather(parts, partial.contiguous())
    return torch.stack(parts).logsumexp(dim=0)


@dataclass
class BatchView:
    """This process's rows and the global batch they belong to.

    ``global_embeddings[m][offset : offset + local_rows]`` are this rank's rows;
    ``present``/``global_present`` are ``[rows, M]`` bool masks in ``modalities`` order;
    ``groups``/``global_groups`` the rows' group ids (``None`` when the data has none).
    """

    modalities: list[str]
    embeddings: dict[str, Tensor]
    global_embeddings: dict[str, Tensor]
    present: Tensor
    global_present: Tensor
    offset: int
    world_size: int
    groups: Tensor | None = None
    global_groups: Tensor | None = None

    @classmethod
    def gather(
        cls,
        embeddings: dict[str, Tensor],
        present: Tensor | None,
        with_grad: bool = True,
        groups: Tensor | None = None,
    ) -> BatchView:
        """Check shapes, fill ``present`` and all-gather (with ``groups``) when distributed."""
        modalities = list(embeddings)
        rows = _check_shapes(embeddings)
        device = next(iter(embeddings.values())).device
        present = _check_present(present, rows, modalities, device)
        groups = _check_groups(groups, rows, device)
        if world_size() == 1:
            return cls(modalities, embeddings, embeddings, present, present, 0, 1, groups, groups)
        counts = _row_counts(rows, device)
        gathered = {
            name: all_gather_rows(value, counts, with_grad) for name, value in embeddings.items()
        }
        global_present = all_gather_rows(present.to(torch.uint8), counts, False).bool()
        global_groups = None if groups is None else all_gather_rows(groups, counts, False)
        offset = sum(counts[: rank()])
        return cls(
            modalities,
            embeddings,
            gathered,
            present,
            global_present,
            offset,
            len(counts),
            groups,
            global_groups,
        )

    @property
    def rows(self) -> int:
        return self.present.shape[0]

    @property
    def global_rows(self) -> int:
        return self.global_present.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.embeddings.values())).dtype

    @property
    def device(self) -> torch.device:
        return self.present.device

    def column(self, name: str, global_batch: bool = False) -> Tensor:
        """The presence mask of one modality, local or global."""
        mask = self.global_present if global_batch else self.present
        return mask[:, self.modalities.index(name)]

    def local_global_index(self) -> Tensor:
        """The global row index of each local row."""
        return torch.arange(self.offset, self.offset + self.rows, device=self.device)

    def same_group(self) -> Tensor:
        """``BoolTensor[rows, global_rows]``: local row ``i`` and global row ``k`` share a
        group (without groups: ``k`` is ``i``'s own row)."""
        if self.groups is None or self.global_groups is None:  # both or neither
            columns = torch.arange(self.global_rows, device=self.device)
            return self.local_global_index()[:, None] == columns[None, :]
        return self.groups[:, None] == self.global_groups[None, :]

    def zero(self) -> Tensor:
        """A zero scalar attached to the graph of every embedding (zero gradients, no NaN)."""
        return functools.reduce(
            operator.add, (value.sum() * 0.0 for value in self.embeddings.values())
        )


def _check_shapes(embeddings: dict[str, Tensor]) -> int:
    if not embeddings:
        raise ValueError("objective got no embeddings; pass {modality: Tensor[B, d]}")
    shapes = {name: tuple(value.shape) for name, value in embeddings.items()}
    first = next(iter(embeddings.values()))
    if (
        any(value.dim() != 2 for value in embeddings.values())
        or len({shape for shape in shapes.values()}) != 1
    ):
        raise ValueError(
            f"objective needs embeddings of one shape [B, d] for every modality, got {shapes}; "
            "absent rows must be present as rows (zeros) with present[:, m] = False"
        )
    wrong = {
        name: str(value.dtype)
        for name, value in embeddings.items()
        if not value.is_floating_point()
    }
    if wrong:
        raise ValueError(f"objective needs floating-point embeddings, got {wrong}")
    return first.shape[0]


def _check_groups(groups: Tensor | None, rows: int, device: torch.device) -> Tensor | None:
    if groups is None:
        return None
    if tuple(groups.shape) != (rows,) or groups.is_floating_point():
        raise ValueError(
            f"groups must be an integer tensor [{rows}] (one group id per row), got "
            f"{groups.dtype} {tuple(groups.shape)}"
        )
    return groups.to(device=device, dtype=torch.long)


def _check_present(
    present: Tensor | None, rows: int, modalities: list[str], device: torch.device
) -> Tensor:
    if present is None:
        return torch.ones(rows, len(modalities), dtype=torch.bool, device=device)
    if tuple(present.shape) != (rows, len(modalities)):
        raise ValueError(
            f"present has shape {tuple(present.shape)} but the batch needs "
            f"[{rows}, {len(modalities)}] (rows, modalities {modalities})"
        )
    return present.to(device=device, dtype=torch.bool)
