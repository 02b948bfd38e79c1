"""PNG figures of an evaluation: confusion matrix, similarity matrix, recall@k curves.

Figures are drawn with matplotlib's object API (no pyplot, no display needed).

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "confusion.png"
    >>> plot_confusion(torch.eye(2, dtype=torch.long), ["a", "b"], path, "demo").is_file()
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def plot_confusion(confusion: Tensor, classnames: Sequence[str], path: Path, title: str) -> Path:
    """A confusion matrix (rows: true class, columns: predicted), counts in the cells."""
    size = max(4.0, 0.45 * len(classnames) + 2)
    figure = Figure(figsize=(size, size))
    axes = figure.add_subplot()
    image = axes.imshow(confusion.numpy(), cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046)
    ticks = range(len(classnames))
    axes.set_xticks(ticks, classnames, rotation=90)
    axes.set_yticks(ticks, classnames)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    if len(classnames) <= 20:
        for (row, column), count in zip(
            torch.cartesian_prod(*[torch.arange(len(classnames))] * 2), confusion.flatten()
        ):
            axes.text(int(column), int(row), str(int(count)), ha="center", va="center", fontsize=7)
    return _save(figure, path)


def plot_similarity(queries: Tensor, gallery: Tensor, path: Path, title: str) -> Path:
    """The cosine-similarity matrix of a batch (matching pairs on the diagonal)."""
    figure = Figure(figsize=(5, 4.5))
    axes = figure.add_subplot()
    image = axes.imshow((queries @ gallery.T).numpy(), cmap="viridis")
    figure.colorbar(image, ax=axes, fraction=0.046)
    axes.set_title(title)
    axes.set_xlabel("gallery sample")
    axes.set_ylabel("query sample")
    return _save(figure, path)


def plot_recall_curves(curves: Mapping[str, Tensor], path: Path) -> Path:
    """Recall@k against k for each retrieval direction."""
    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    for name, curve in curves.items():
        axes.plot(range(1, len(curve) + 1), curve.numpy(), label=name)
    axes.set_xscale("log")
    axes.set_xlabel("k")
    axes.set_ylabel("recall@k")
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    return _save(figure, path)
