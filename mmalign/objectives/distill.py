"""``distill``: match a frozen teacher's similarity distributions over the batch (open_clip's
``--distill-model``, TinyCLIP).

For a pair ``(a, b)`` the teacher's embeddings ``a@teacher`` and ``b@teacher`` (no gradient,
any ``dim``) give, for each valid row, the softmax of the row's similarities to every valid
column of the global batch; the student's embeddings give its own. The per-row loss is the
mean over the two directions of ``KL(teacher || student)``; rows and columns are the valid ones
(both modalities present). Each side uses its own multiplier (``1 / temperature``, or its
learned ``logit_scale``).

Example:
    >>> import torch
    >>> from mmalign.objectives.distributed import BatchView
    >>> student = BatchView.gather({"a": torch.eye(2), "b": torch.eye(2)}, None)
    >>> teacher = BatchView.gather({"a@teacher": torch.eye(3)[:2], "b@teacher": torch.eye(3)[:2]},
    ...                            None)
    >>> term = distill_term(student, teacher, ("a", "b"), 5.0, 5.0)
    >>> term.valid_rows, abs(term.row_loss_sum.item()) < 1e-6
    (2, True)
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from mmalign.objectives.base import TermLoss
from mmalign.objectives.distributed import BatchView
from mmalign.objectives.options.pairwise import pair_name

TEACHER = "@teacher"
"""Suffix of the teacher's embeddings of a modality (``image@teacher``)."""


def teacher_name(modality: str) -> str:
    """The key of the teacher's embeddings of ``modality``."""
    return modality + TEACHER


def _direction(
    batch: BatchView,
    teachers: BatchView,
    rows: str,
    columns: str,
    valid: Tensor,
    scales: tuple[Tensor | float, Tensor | float],
) -> Tensor:
    local = valid[batch.offset : batch.offset + batch.rows]
    student = (scales[0] * batch.embeddings[rows][local]) @ batch.global_embeddings[columns][
        valid
    ].T
    teacher_rows = teachers.embeddings[teacher_name(rows)][local].to(student.dtype)
    teacher_columns = teachers.global_embeddings[teacher_name(columns)][valid].to(student.dtype)
    teacher = (scales[1] * teacher_rows) @ teacher_columns.T
    return F.kl_div(
        F.log_softmax(student, dim=-1),
        F.log_softmax(teacher, dim=-1),
        reduction="sum",
        log_target=True,
    )


def distill_term(
    batch: BatchView,
    teachers: BatchView,
    pair: tuple[str, str],
    student_scale: Tensor | float,
    teacher_scale: Tensor | float,
) -> TermLoss:
    """The distillation term of one pair (named ``"a-b"``): KL summed over this rank's valid
    rows (mean of the two directions), and the global count of valid rows. ``teachers`` holds
    the teacher's embeddings (``a@teacher``, gathered like ``batch``, of their own width)."""
    first, second = pair
    valid = batch.column(first, global_batch=True) & batch.column(second, global_batch=True)
    for name in (first, second):
        valid = valid & teachers.column(teacher_name(name), global_batch=True)
    scales = (student_scale, teacher_scale)
    loss_sum = _direction(batch, teachers, first, second, valid, scales)
    loss_sum = loss_sum + _direction(batch, teachers, second, first, valid, scales)
    return TermLoss(pair_name(pair), loss_sum / 2, int(valid.sum()))
