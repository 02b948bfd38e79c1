"""PNG figures of an evaluation: confusion matrix, similarity matrix, recall@k curves; and
the conventions every mmalign figure shares (:func:`series_colours`, :data:`LEVEL_STYLES`,
:func:`save_figure`).

Figures are drawn with matplotlib's object API (no pyplot, no display needed). Every figure
has a title and labelled axes with their units; a series keeps its colour in every figure
(colours are given by the series' name in a fixed order), instance-level retrieval is drawn
solid and class-level dashed.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "confusion.png"
    >>> plot_confusion(torch.eye(2, dtype=torch.long), ["a", "b"], path, "demo").is_file()
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from mmalign.extras import missing_extra
from mmalign.files import atomic_write

try:
    from matplotlib.figure import Figure
except ImportError:
    raise missing_extra("plots", "figures (train.plots, mmalign eval)") from None


PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
"""matplotlib's ``tab10`` colours, in order."""
LEVEL_STYLES = {"instance": "-", "class": "--"}
"""Line style of each retrieval level."""


def series_colours(names: Iterable[str]) -> dict[str, str]:
    """A distinct colour for each series name, the same whatever figure draws the same
    names: the sorted names take :data:`PALETTE` in order (matplotlib's ``tab20`` beyond 10).

    Example:
        >>> series_colours(["text->image", "image->text"])
        {'image->text': '#1f77b4', 'text->image': '#ff7f0e'}
    """
    ordered = sorted(set(names))
    if len(ordered) <= len(PALETTE):
        return dict(zip(ordered, PALETTE, strict=False))
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    many = colormaps["tab20"] if len(ordered) <= 20 else colormaps["turbo"].resampled(len(ordered))
    return {name: to_hex(many(i)) for i, name in enumerate(ordered)}


def save_figure(figure: Figure, path: Path) -> Path:
    """Lay out ``figure`` and write it as a PNG at ``path`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=120))
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
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(f"{title}\n(cells: sample counts)")
    if len(classnames) <= 20:
        for (row, column), count in zip(
            torch.cartesian_prod(*[torch.arange(len(classnames))] * 2), confusion.flatten()
        ):
            axes.text(int(column), int(row), str(int(count)), ha="center", va="center", fontsize=7)
    return save_figure(figure, path)


def plot_similarity(queries: Tensor, gallery: Tensor, path: Path, title: str) -> Path:
    """The cosine-similarity matrix of a batch (matching pairs on the diagonal)."""
    figure = Figure(figsize=(5, 4.5))
    axes = figure.add_subplot()
    image = axes.imshow((queries @ gallery.T).numpy(), cmap="viridis")
    colorbar = figure.colorbar(image, ax=axes, fraction=0.046)
    colorbar.set_label("cosine similarity (-1 to 1)")
    axes.set_title(title)
    axes.set_xlabel("gallery sample (index)")
    axes.set_ylabel("query sample (index)")
    return save_figure(figure, path)


def plot_recall_curves(curves: Mapping[str, Mapping[str, Tensor]], path: Path) -> Path:
    """Recall@k against k for each retrieval direction: ``curves`` maps a level
    (``instance``, ``class``) to ``{"query->gallery": curve}``; a direction has one colour,
    its instance curve solid and its class curve dashed."""
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    colours = series_colours(name for by_name in curves.values() for name in by_name)
    for level, by_name in curves.items():
        for name, curve in sorted(by_name.items()):
            axes.plot(
                range(1, len(curve) + 1),
                curve.numpy(),
                color=colours[name],
                linestyle=LEVEL_STYLES[level],
                label=f"{name} ({level})",
            )
    axes.set_xscale("log")
    axes.set_xlabel("k (gallery items returned, log scale)")
    axes.set_ylabel("recall@k (fraction of queries, 0-1)")
    axes.set_ylim(0, 1.02)
    axes.set_title("retrieval: recall@k (solid: own pair, dashed: same class)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_figure(figure, path)
