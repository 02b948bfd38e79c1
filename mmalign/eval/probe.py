"""Linear probe and few-shot classification on frozen embeddings (scikit-learn).

A multinomial logistic regression (``sklearn.linear_model.LogisticRegression``, lbfgs) is
fitted on the embeddings of a labelled train split and scored on the test split. Its
regularization ``C`` is chosen from :data:`C_GRID` by accuracy on a held-out part of the
train split, then the probe is refitted with that ``C``:

- full probe: a stratified 20% of train is held out to choose ``C``, then the probe is
  refitted on all of train;
- ``shots`` per class (few-shot): the probe sees ``shots`` random samples of each class;
  ``C`` is chosen on (up to 2,000 of) the other train samples.

Every random choice comes from ``seed``.

Example:
    >>> import torch
    >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]] * 5)
    >>> y = torch.tensor([0, 0, 1, 1] * 5)
    >>> linear_probe(x, y, x, y)["top1"]
    1.0
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from torch import Tensor

from mmalign.eval.loading import check_modalities, collect_embeddings, load_model
from mmalign.progress import progress_bar

if TYPE_CHECKING:
    from mmalign.model import AlignmentModel

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
"""Inverse regularization strengths tried on the held-out part of train."""
HELD_OUT = 0.2
VALIDATION_CAP = 2000


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> LogisticRegression:
    return LogisticRegression(C=c, max_iter=1000, random_state=seed).fit(x, y)


def _few_shot_split(
    labels: np.ndarray, shots: int, generator: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    chosen: list[int] = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        if rows.size <= shots:
            raise ValueError(
                f"class {label} has {rows.size} train samples; {shots}-shot needs more"
            )
        chosen.extend(generator.choice(rows, size=shots, replace=False))
    fit = np.sort(np.asarray(chosen))
    rest = np.setdiff1d(np.arange(labels.size), fit)
    if rest.size > VALIDATION_CAP:
        rest = np.sort(generator.choice(rest, size=VALIDATION_CAP, replace=False))
    return fit, rest


def linear_probe(
    train_embeddings: Tensor,
    train_labels: Tensor,
    test_embeddings: Tensor,
    test_labels: Tensor,
    *,
    shots: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Test accuracy of a logistic-regression probe (see the module docstring).

    Returns ``{"top1", "C", "fit_samples", "test_samples", "validation_top1"}``.

    Example:
        >>> import torch
        >>> x = torch.eye(2).repeat(6, 1)
        >>> linear_probe(x, torch.tensor([0, 1] * 6), x, torch.tensor([0, 1] * 6), shots=2)["C"]
        0.01
    """
    x = train_embeddings.detach().float().cpu().numpy()
    y = train_labels.detach().cpu().numpy()
    generator = np.random.default_rng(seed)
    if shots is None:
        fit_rows, check_rows = train_test_split(
            np.arange(y.size), test_size=HELD_OUT, random_state=seed, stratify=y
        )
    else:
        fit_rows, check_rows = _few_shot_split(y, shots, generator)
    name = "linear probe" if shots is None else f"{shots}-shot probe"
    validation = {
        c: float(_fit(x[fit_rows], y[fit_rows], c, seed).score(x[check_rows], y[check_rows]))
        for c in progress_bar(C_GRID, desc=f"{name}: C", unit="fit")
    }
    best = max(C_GRID, key=lambda c: (validation[c], -c))  # ties: the stronger regularization
    final_rows = np.arange(y.size) if shots is None else fit_rows
    probe = _fit(x[final_rows], y[final_rows], best, seed)
    test_x = test_embeddings.detach().float().cpu().numpy()
    top1 = float(probe.score(test_x, test_labels.detach().cpu().numpy()))
    return {
        "top1": top1,
        "C": best,
        "fit_samples": int(final_rows.size),
        "test_samples": int(test_x.shape[0]),
        "validation_top1": validation[best],
    }


def run_probe(
    model: AlignmentModel,
    train_shards: str | Sequence[str],
    test_shards: str | Sequence[str],
    modality: str,
    few_shot: Sequence[int] = (),
    *,
    linear: bool = True,
    seed: int = 0,
    **loader_options: Any,
) -> dict[str, dict[str, Any]]:
    """Embed the labelled train and test splits of ``modality`` and probe them: ``linear``
    (all of train) and each ``k`` of ``few_shot``; ``loader_options`` are those of
    :func:`~mmalign.eval.loading.collect_embeddings` (``fields``, ``label_field`` (default
    ``cls``), ...).

    Example:
        >>> run_probe("runs/digits", "data/digits/train-000000.tar",
        ...           "data/digits/test-000000.tar", "image", [1, 5])["5-shot"]["top1"]
        ... # doctest: +SKIP
        0.97
    """
    model = load_model(model)
    check_modalities(model, [modality], "--probe-modality")
    loader_options.setdefault("label_field", "cls")
    splits = {}
    for name, shards in (("train", train_shards), ("test", test_shards)):
        collected = collect_embeddings(model, shards, [modality], **loader_options)
        usable = (collected.labels >= 0) & collected.present[modality]
        if not usable.any():
            raise ValueError(f"{shards}: no record has both a label and {modality!r}")
        splits[name] = (collected.embeddings[modality][usable], collected.labels[usable])
    results = {}
    settings = ([("linear", None)] if linear else []) + [(f"{k}-shot", k) for k in few_shot]
    for name, shots in settings:
        results[name] = linear_probe(*splits["train"], *splits["test"], shots=shots, seed=seed)
    return results
