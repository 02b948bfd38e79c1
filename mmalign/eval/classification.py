"""Classification metrics from class scores: top-k, per-class accuracy, confusion matrix.

Top-k uses the same pessimistic tie rule as retrieval: the rank of the true class is one plus
the number of other classes scoring at least as high, so ties never count as correct by luck.

Example:
    >>> import torch
    >>> scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    >>> labels = torch.tensor([0, 1, 1])
    >>> topk_accuracy(scores, labels, ks=(1, 2))
    {'top1': 0.6666666666666666, 'top2': 1.0}
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _check_labels(labels: Tensor, num_classes: int) -> Tensor:
    labels = labels.detach().cpu().long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}); got values from {int(labels.min())} to "
            f"{int(labels.max())} (drop unlabelled samples, label -1, first)"
        )
    return labels


def true_class_rank(scores: Tensor, labels: Tensor) -> Tensor:
    """1-based rank of the true class in each row, ties counted against it.

    Example:
        >>> true_class_rank(torch.tensor([[0.5, 0.5, 0.1]]), torch.tensor([0])).tolist()
        [2]
    """
    scores = scores.detach().cpu().float()
    labels = _check_labels(labels, scores.shape[1])
    true_scores = scores.gather(1, labels[:, None])
    return (scores >= true_scores).sum(dim=1)


def topk_accuracy(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Fraction of rows whose true class ranks in the top k, for each k (``top{k}`` keys).

    Example:
        >>> topk_accuracy(torch.tensor([[0.1, 0.9]]), torch.tensor([1]), ks=(1,))
        {'top1': 1.0}
    """
    ranks = true_class_rank(scores, labels)
    return {f"top{k}": float((ranks <= k).double().mean()) for k in ks}


def confusion_matrix(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``[C, C]`` counts, rows = true class, columns = predicted class.

    Example:
        >>> confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), 2).tolist()
        [[1, 1], [0, 1]]
    """
    labels = _check_labels(labels, num_classes)
    predictions = _check_labels(predictions, num_classes)
    flat = labels * num_classes + predictions
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_accuracy(confusion: Tensor) -> Tensor:
    """Accuracy (recall) of each class from a confusion matrix; NaN for classes with no sample.

    Example:
        >>> per_class_accuracy(torch.tensor([[1, 1], [0, 1]])).tolist()
        [0.5, 1.0]
    """
    totals = confusion.sum(dim=1).double()
    correct = confusion.diagonal().double()
    return torch.where(totals > 0, correct / totals.clamp(min=1), torch.nan)


def classification_metrics(
    scores: Tensor,
    labels: Tensor,
    classnames: Sequence[str] | None = None,
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Top-k accuracy, balanced accuracy (mean per-class accuracy) and ``acc/{class}``.

    Example:
        >>> import torch
        >>> m = classification_metrics(torch.eye(2), torch.tensor([0, 1]), ["a", "b"], ks=(1,))
        >>> m["top1"], m["balanced_accuracy"], m["acc/b"]
        (1.0, 1.0, 1.0)
    """
    num_classes = scores.shape[1]
    names = list(classnames) if classnames is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for scores with {num_classes} columns")
    ks = [k for k in ks if k <= num_classes]
    metrics = topk_accuracy(scores, labels, ks)
    confusion = confusion_matrix(scores.argmax(dim=1), labels, num_classes)
    accuracy = per_class_accuracy(confusion)
    metrics["balanced_accuracy"] = float(accuracy.nanmean())
    metrics.update({f"acc/{name}": float(value) for name, value in zip(names, accuracy)})
    return metrics
