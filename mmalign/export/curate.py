"""Curate shards with a trained model: score every record, keep the well-aligned ones, drop
near-duplicates, write new shards and a report (``mmalign prep curate``).

1. **Score.** Every record is embedded with the model (each modality it has). Its score is
   the cosine of its two modalities' embeddings; with more modalities, the objective's own
   score when it scores them jointly (Symile: the multilinear inner product of the others
   with the last modality), else the mean cosine over the pairs it has (what pairwise
   objectives train up, pair by pair). A record with fewer than two of the modalities (for
   a joint score: without the last one) cannot be scored: ``missing="keep"`` (default)
   keeps it, ``"drop"`` drops it (reason ``missing_modality``).
2. **Cut.** ``threshold`` keeps the records scoring at least that; ``keep_fraction`` keeps
   that fraction of the scored records, best first (the cut is the lowest kept score).
   Dropped: ``low_score``.
3. **Near-duplicates.** Among the records kept so far, a FAISS range search on one
   modality's normalized embeddings (``dedup``, default the first) finds the pairs with cosine
   at least ``dedup_threshold`` (default 0.995: copies and re-encodes of the same item, not
   two items of one class); of each such group the first record in reading order is kept,
   the others are dropped as ``duplicate``.
4. **Write.** The kept records are copied byte for byte, in reading order, to
   ``out/curated-000000.tar`` ...; records that could not be read or decoded are dropped as
   ``unreadable``; the original shards are only read. ``out/curate.json`` holds the counts by
   reason, the cut and examples of dropped records, ``out/scores.png`` the score histogram
   with the cut.

Under ``torchrun`` / ``accelerate launch`` each rank embeds its share of the records (the
export's split); rank 0 gathers the embeddings, puts them back in reading order and does
steps 1-4, so the result is the one of a single process; the other ranks wait and return
its report.

Example:
    >>> report = curate("runs/digits", "data/digits/train-{000000..000007}.tar", "clean",
    ...                 keep_fraction=0.8)  # doctest: +SKIP
    >>> report["kept"], report["dropped"]  # doctest: +SKIP
    (4022, {'low_score': 1006})
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import torch
import torch.distributed as dist

from mmalign.config import ConfigError
from mmalign.data.records import log_skip, read_shards, unsafe_key
from mmalign.data.shard_writer import ShardWriter
from mmalign.data.sources import resolve_sources
from mmalign.dist import barrier, join_launched_group
from mmalign.eval.loading import CollectedEmbeddings, collect_embeddings, load_model
from mmalign.eval.plots import save_figure
from mmalign.files import clear_old_shards, read_json, refuse_links, write_json
from mmalign.objectives import Objective
from mmalign.output_owner import Output, check_output, claim_output, record_output

if TYPE_CHECKING:
    from mmalign.model import AlignmentModel

EXAMPLES = 5
"""Dropped records shown per reason in the report."""
CURATED = Output("prep curate", "--out", ("curated-*.tar",))
"""The owner of a curated folder (:mod:`mmalign.output_owner`): its shards may differ from its
record after a failed run."""


def pair_scores(
    embeddings: Mapping[str, torch.Tensor], present: Mapping[str, torch.Tensor]
) -> np.ndarray:
    """Per record: the mean cosine over its pairs of present modalities (NaN: fewer than 2).

    Example:
        >>> e = {"a": torch.tensor([[1.0, 0.0], [1.0, 0.0]]), "b": torch.tensor([[1.0, 0.0],
        ...      [0.0, 1.0]])}
        >>> pair_scores(e, {"a": torch.tensor([True, True]), "b": torch.tensor([True, False])})
        array([ 1., nan], dtype=float32)
    """
    names = list(embeddings)
    unit = {m: torch.nn.functional.normalize(embeddings[m].float(), dim=-1) for m in names}
    total = torch.zeros(len(present[names[0]]))
    pairs = torch.zeros(len(present[names[0]]))
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            both = (present[first] & present[second]).float()
            total += (unit[first] * unit[second]).sum(-1) * both
            pairs += both
    scores = (total / pairs.clamp(min=1)).numpy().astype(np.float32)
    scores[pairs.numpy() == 0] = np.nan
    return scores


def joint_scores(
    objective: Objective,
    embeddings: Mapping[str, torch.Tensor],
    present: Mapping[str, torch.Tensor],
    chunk: int = 1024,
) -> np.ndarray:
    """Per record: the objective's own score (``objective.score``) of its other modalities
    as the query against its last modality as the candidate (NaN: that one or all others
    absent); Symile's multilinear inner product for a Symile model.

    Example:
        >>> from mmalign.objectives import build_objective
        >>> e = {m: torch.tensor([[1.0, 2.0], [1.0, 1.0]]) for m in "abc"}
        >>> p = {"a": torch.tensor([True, True]), "b": torch.tensor([True, False]),
        ...      "c": torch.tensor([True, True])}
        >>> joint_scores(build_objective({"name": "symile"}), e, p)
        array([9., 2.], dtype=float32)
    """
    *queries, candidate = list(embeddings)
    rows = len(present[candidate])
    scores = np.full(rows, np.nan, dtype=np.float32)
    for start in range(0, rows, chunk):
        part = slice(start, start + chunk)
        grid = objective.score(
            {m: embeddings[m][part].float() for m in queries},
            embeddings[candidate][part],
            {m: present[m][part] for m in queries},
        )
        scores[part] = torch.diagonal(grid).numpy()
    others = torch.stack([present[m] for m in queries]).any(0)
    scores[~(present[candidate] & others).numpy()] = np.nan
    return scores


def record_scores(
    objective: Objective,
    embeddings: Mapping[str, torch.Tensor],
    present: Mapping[str, torch.Tensor],
) -> np.ndarray:
    """The score of each record: :func:`pair_scores` for two modalities or a pairwise
    objective, :func:`joint_scores` for three or more with a jointly scoring one (Symile)."""
    if len(embeddings) > 2 and objective.scores_jointly:
        return joint_scores(objective, embeddings, present)
    return pair_scores(embeddings, present)


def score_cut(scores: np.ndarray, threshold: float | None, keep_fraction: float | None) -> float:
    """The lowest score kept: ``threshold``, or the score of the ``keep_fraction`` quantile
    of the scored records (best first); ``-inf`` when neither is given.

    Example:
        >>> score_cut(np.array([0.1, 0.9, 0.5, 0.7]), None, 0.5)
        0.7
    """
    if threshold is not None:
        return float(threshold)
    scored = np.sort(scores[~np.isnan(scores)])[::-1]
    if keep_fraction is None or len(scored) == 0:
        return float("-inf")
    kept = max(1, round(keep_fraction * len(scored)))
    return float(scored[min(kept, len(scored)) - 1])


def near_duplicates(vectors: np.ndarray, candidates: np.ndarray, threshold: float) -> np.ndarray:
    """Which ``candidates`` rows repeat an earlier candidate: cosine >= ``threshold`` (a FAISS
    range search on the normalized rows); the first of each group is not a duplicate.

    Example:
        >>> v = np.array([[1, 0], [0, 1], [1, 0.001], [1, 0]], dtype=np.float32)
        >>> near_duplicates(v, np.array([True, True, True, False]), 0.99).tolist()
        [False, False, True, False]
    """
    rows = np.flatnonzero(candidates)
    duplicate = np.zeros(len(vectors), dtype=bool)
    if len(rows) < 2:
        return duplicate
    unit = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    faiss.normalize_L2(unit)
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    limits, _, neighbours = index.range_search(unit, float(threshold))
    for row in range(len(rows)):
        if duplicate[rows[row]]:
            continue
        later = neighbours[limits[row] : limits[row + 1]]
        duplicate[rows[later[later > row]]] = True
    return duplicate


def decide(
    scores: np.ndarray,
    dedup_vectors: np.ndarray | None,
    cut: float,
    *,
    missing: str = "keep",
    dedup_threshold: float = 0.995,
) -> list[str]:
    """Per record: ``""`` (kept) or why it is dropped (``missing_modality``, ``low_score``,
    ``duplicate``)."""
    scores = np.asarray(scores, dtype=np.float64)  # a cut beyond float32 (1e308) compares
    unscored = np.isnan(scores)
    reasons = np.full(len(scores), "", dtype=object)
    if missing == "drop":
        reasons[unscored] = "missing_modality"
    reasons[~unscored & ~(scores >= cut)] = "low_score"
    if dedup_vectors is not None:
        duplicate = near_duplicates(dedup_vectors, reasons == "", dedup_threshold)
        reasons[duplicate] = "duplicate"
    return [str(reason) for reason in reasons]


def _plot_scores(scores: np.ndarray, cut: float, path: Path) -> Path:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5))
    axes = figure.add_subplot()
    scored = scores[~np.isnan(scores)]
    axes.hist(scored, bins=50, color="#1f77b4")
    if np.isfinite(cut):
        axes.axvline(cut, color="#d62728", linestyle="--", label=f"cut {cut:.3f}")
        axes.legend()
    axes.set_xlabel("record score (cosine between its modalities)")
    axes.set_ylabel("records")
    axes.set_title(f"{len(scored)} scored records; kept: score >= cut")
    return save_figure(figure, path)


def _example(raw: Mapping[str, Any], score: float) -> dict[str, Any]:
    """A dropped record as the report shows it: key, shard, score, its text files."""
    texts = {
        name: value.decode("utf-8", "replace")[:120]
        for name, value in raw.items()
        if name.endswith("txt") and isinstance(value, bytes)
    }
    return {"key": raw["__key__"], "shard": raw["__url__"], "score": score, **texts}


def _write(
    urls: Sequence[str], verdicts: Mapping[str, tuple[str, float]], out: Path, maxcount: int
) -> tuple[Counter[str], dict[str, list[dict[str, Any]]]]:
    """Copy the kept records to ``out``; the counts by reason and examples of dropped ones."""
    counts: Counter[str] = Counter()
    examples: dict[str, list[dict[str, Any]]] = {}
    claim_output(out, CURATED, urls)
    refuse_links(out, "output directory", "--out")  # no shard, report or plot through a link
    clear_old_shards(out, "curated")
    pattern = str(out / "curated-%06d.tar")
    with ShardWriter(pattern, maxcount=maxcount, verbose=0) as writer:
        for raw in read_shards({"url": url} for url in urls):
            reason, score = verdicts.get(raw["__key__"], ("unreadable", float("nan")))
            if "__error__" in raw:
                reason = "unreadable"
            elif unsafe_key(raw["__key__"]) is not None:  # it would name a member outside
                reason = "unsafe_key"
                log_skip(raw["__url__"], raw["__key__"], reason, str(unsafe_key(raw["__key__"])))
            counts[reason or "kept"] += 1
            if reason:
                shown = examples.setdefault(reason, [])
                if len(shown) < EXAMPLES:
                    shown.append(_example(raw, score))
                continue
            writer.write({k: v for k, v in raw.items() if k != "__url__"})
    return counts, examples


def _in_reading_order(
    parts: Sequence[CollectedEmbeddings], urls: Sequence[str]
) -> CollectedEmbeddings:
    """The ranks' embeddings joined, in the order one process reads ``urls``."""
    position = {raw["__key__"]: i for i, raw in enumerate(read_shards({"url": u} for u in urls))}
    keys = [key for part in parts for key in part.keys]
    order = torch.tensor(sorted(range(len(keys)), key=lambda row: position[keys[row]]))
    joined = {m: torch.cat([part.embeddings[m] for part in parts]) for m in parts[0].embeddings}
    present = {m: torch.cat([part.present[m] for part in parts]) for m in parts[0].present}
    return CollectedEmbeddings(
        keys=[keys[row] for row in order.tolist()],
        embeddings={m: value[order] for m, value in joined.items()},
        present={m: value[order] for m, value in present.items()},
        labels=torch.cat([part.labels for part in parts])[order],
    )


def _embed(
    trained: AlignmentModel, urls: Sequence[str], names: Sequence[str], **options: Any
) -> CollectedEmbeddings | None:
    """Every record's embeddings on rank 0 (None on the other ranks); in a launched group each
    rank embeds its share and rank 0 gathers them."""
    rank, world_size = join_launched_group()
    collected = collect_embeddings(
        trained, urls, names, rank=rank, world_size=world_size, **options
    )
    if world_size == 1:
        return collected
    parts: list[Any] = [None] * world_size if rank == 0 else []
    dist.gather_object(collected, parts if rank == 0 else None, dst=0)
    return _in_reading_order(parts, urls) if rank == 0 else None


def curate(
    model: str | Path,
    shards: str | Sequence[str],
    out: str | Path,
    *,
    modalities: Sequence[str] | None = None,
    fields: Mapping[str, str] | None = None,
    threshold: float | None = None,
    keep_fraction: float | None = None,
    missing: str = "keep",
    dedup: str | None = "",
    dedup_threshold: float = 0.995,
    batch_size: int = 256,
    maxcount: int = 10000,
) -> dict[str, Any]:
    """Score, cut, de-duplicate and write the records of ``shards`` (module docstring);
    returns the report written to ``out/curate.json``. ``dedup``: the modality of the
    near-duplicate search (``""``: the first of ``modalities``; None: no search)."""
    urls = [url for source in resolve_sources(shards, "--data") for url in source.urls]
    check_output(out, CURATED, urls)  # before the model loads and the records are scored
    trained = load_model(model)
    names = list(modalities or trained.modalities)
    dedup = names[0] if dedup == "" else dedup
    if dedup is not None and dedup not in names:
        raise ConfigError(
            f"{dedup!r} is not one of the scored modalities {names} (--dedup); name one of "
            "them or pass --no-dedup"
        )
    collected = _embed(trained, urls, names, fields=fields, run_dir=model, batch_size=batch_size)
    out = Path(out)
    if collected is None:  # another rank than 0: rank 0 writes the result
        barrier()
        return dict(read_json(out / "curate.json") or {})
    scores = record_scores(trained.objective, collected.embeddings, collected.present)
    cut = score_cut(scores, threshold, keep_fraction)
    vectors = None
    if dedup is not None:
        present = collected.present[dedup].numpy()[:, None]
        vectors = np.where(present, collected.embeddings[dedup].numpy(), 0.0)
    reasons = decide(scores, vectors, cut, missing=missing, dedup_threshold=dedup_threshold)
    verdicts = dict(zip(collected.keys, zip(reasons, scores.tolist(), strict=True), strict=True))
    out.mkdir(parents=True, exist_ok=True)
    counts, examples = _write(urls, verdicts, out, maxcount)
    _plot_scores(scores, cut, out / "scores.png")
    report = {
        "shards": urls,
        "modalities": names,
        "cut": cut,
        "dedup": {"modality": dedup, "threshold": dedup_threshold},
        "kept": counts.pop("kept", 0),
        "dropped": dict(sorted(counts.items())),
        "examples": examples,
        "written": sorted(path.name for path in out.glob("curated-*.tar")),
    }
    write_json(out / "curate.json", report, indent=1, sort_keys=False)  # no cut: null
    record_output(out, CURATED)
    barrier()
    return report
