"""The training curves of a run directory, from its ``metrics.jsonl`` records.

:func:`plot_metrics` writes

- ``loss.png``: the training and the validation loss against the optimizer step, and below
  them a panel of the loss terms (a Matryoshka run's loss at each prefix, else each pair's);
  timings (``time/*``, seconds) are not losses and stay out;
- ``temperature.png``: the learned temperature tau (left axis) and the logit scale
  ``1 / tau`` that multiplies the similarities (right axis);
- ``validation.png``: validation means over steps, one colour per metric (``R@1``, ``R@5``,
  ``R@10``, ``mAP``, zero-shot top-1) and level, instance level solid with round markers
  and class level dashed with square ones.

Figures follow :mod:`mmalign.eval.plots` (titles, axis units, fixed colours per series).

Example:
    >>> import tempfile
    >>> records = [{"step": 1, "train/loss": 2.0, "time/loss": 0.1},
    ...            {"step": 2, "train/loss": 1.5, "val/loss": 1.7}]
    >>> [path.name for path in plot_metrics(records, Path(tempfile.mkdtemp()))]
    ['loss.png']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmalign.eval.plots import LEVEL_STYLES, PALETTE, save_figure, series_colours
from mmalign.extras import missing_extra

try:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
except ImportError:
    raise missing_extra("plots", "train.plots", "or set train.plots: false") from None

Series = dict[str, tuple[list[int], list[float]]]
VALIDATION_METRICS = ("R@1", "R@5", "R@10", "mAP", "zeroshot top-1")
"""Validation series, each with its colour (see :func:`series_colours`)."""


def collect_series(records: Sequence[dict[str, Any]], wanted: Callable[[str], bool]) -> Series:
    """``{key: (steps, values)}`` of the finite numbers whose key is ``wanted``.

    Example:
        >>> collect_series([{"step": 3, "a": 1.0, "b": 2}], lambda key: key == "a")
        {'a': ([3], [1.0])}
    """
    series: Series = {}
    for record in records:
        for key, value in record.items():
            number = isinstance(value, int | float) and math.isfinite(value)
            if key != "step" and number and wanted(key):
                steps, values = series.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(float(value))
    return series


def _is_loss(key: str) -> bool:
    return key in ("train/loss", "val/loss") or key.startswith("train/loss/")


def loss_terms(series: Series) -> list[str]:
    """The loss terms drawn beside the total: a Matryoshka run's per-prefix losses
    (``train/loss/dim16`` ...; its pair terms are those of the full size), else the pair terms.

    Example:
        >>> loss_terms({"train/loss/dim4": ([1], [1.0]), "train/loss/a-b": ([1], [1.0])})
        ['train/loss/dim4']
    """
    terms = sorted(key for key in series if key.startswith("train/loss/"))
    prefixes = [key for key in terms if key.removeprefix("train/loss/dim").isdigit()]
    return sorted(prefixes, key=lambda key: int(key.rsplit("dim", 1)[1])) or terms


def _draw_losses(axes: Axes, series: Series) -> None:
    if "train/loss" in series:
        axes.plot(*series["train/loss"], color="black", linewidth=1.8, label="training")
    if "val/loss" in series:
        steps, values = series["val/loss"]
        axes.plot(steps, values, color=PALETTE[3], linestyle=":", marker="o", label="validation")
    axes.set_ylabel("loss (objective value, nats)")
    axes.set_title("training and validation loss")


def _draw_loss_terms(axes: Axes, series: Series) -> None:
    terms = loss_terms(series)
    colours = series_colours(terms)
    for key in terms:
        name = key.removeprefix("train/loss/")
        prefix = name.removeprefix("dim")
        label = f"first {prefix} dims" if prefix.isdigit() else f"term {name}"
        axes.plot(*series[key], color=colours[key], linewidth=1.2, label=label)
    axes.set_ylabel("loss of each term (nats)")
    axes.set_title("loss terms (the total above is their weighted sum)")


def _draw_temperature(axes: Axes, series: Series) -> None:
    steps, values = series["train/temperature"]
    axes.plot(steps, values, color=PALETTE[0])
    axes.set_ylabel("temperature tau (unitless)", color=PALETTE[0])
    axes.set_title("learned temperature tau and logit scale 1/tau")
    if "train/logit_scale" in series:
        right = axes.twinx()
        right.plot(*series["train/logit_scale"], color=PALETTE[1], linestyle="--")
        right.set_ylabel("logit scale 1/tau (multiplies cosine similarities)", color=PALETTE[1])


def _validation_parts(key: str) -> tuple[str, str] | None:
    """``(metric, level)`` of a validation mean (``val/class/R@1/mean`` -> ``R@1, class``)."""
    parts = key.split("/")
    if key == "val/zeroshot/top1":
        return "zeroshot top-1", "instance"
    if len(parts) == 4 and parts[1] in LEVEL_STYLES and parts[3] == "mean":
        return parts[2], parts[1]
    return None


LEVEL_MARKERS = {"instance": "o", "class": "s"}
"""Marker of each validation level: a run with one validation point still tells them apart."""


def _draw_validation(axes: Axes, series: Series) -> None:
    """One colour per series (metric and level); instance level solid with round markers,
    class level dashed with square ones, so a single point per series stays readable."""
    colours = series_colours(series)
    for key in sorted(series):
        metric, level = _validation_parts(key) or ("", "")
        steps, values = series[key]
        label = metric if metric.startswith("zeroshot") else f"{metric} {level}, mean"
        axes.plot(
            steps,
            values,
            color=colours[key],
            linestyle=LEVEL_STYLES[level],
            marker=LEVEL_MARKERS[level],
            markersize=7,
            label=label,
        )
    axes.set_ylim(0, 1.02)
    axes.set_ylabel("recall / mAP / accuracy (fraction, 0-1)")
    axes.set_title("validation (solid, round: own pair; dashed, square: same class)")


PLOTS: dict[str, tuple[Callable[[str], bool], Callable[[Axes, Series], None]]] = {
    "loss.png": (_is_loss, _draw_losses),
    "temperature.png": (
        lambda key: key in ("train/temperature", "train/logit_scale"),
        _draw_temperature,
    ),
    "validation.png": (lambda key: _validation_parts(key) is not None, _draw_validation),
}
"""File name -> (which metric keys it draws, how)."""


def _figure(filename: str, series: Series) -> tuple[Figure, list[Axes]]:
    """The figure of ``filename`` and its panels, drawn: ``loss.png`` gets a second panel
    for the loss terms when there are any."""
    draw = PLOTS[filename][1]
    panels = [draw]
    if filename == "loss.png" and loss_terms(series):
        panels.append(_draw_loss_terms)
    figure = Figure(figsize=(7, 3.2 * len(panels) + 1.0))
    axes_list = [figure.add_subplot(len(panels), 1, row + 1) for row in range(len(panels))]
    for axes, panel in zip(axes_list, panels, strict=True):
        panel(axes, series)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        handles, _ = axes.get_legend_handles_labels()
        if handles:
            axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    axes_list[-1].set_xlabel("optimizer step")
    return figure, axes_list


def plot_metrics(records: Sequence[dict[str, Any]], directory: Path) -> list[Path]:
    """Write ``loss.png``, ``temperature.png`` and ``validation.png`` (those with data)."""
    written = []
    for filename, (wanted, _) in PLOTS.items():
        series = collect_series(records, wanted)
        if not series or (filename == "temperature.png" and "train/temperature" not in series):
            continue
        figure, _ = _figure(filename, series)
        written.append(save_figure(figure, directory / filename))
    return written
