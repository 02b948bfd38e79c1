"""Checks of a run config that need more than types: files exist, sections agree.

Example:
    >>> from mmalign.config import ConfigError, load_config
    >>> config = load_config({"model": {"towers": {"labs": {"type": "tabular",
    ...     "in_features": 2}}}})
    >>> try:
    ...     check_run_config(config)
    ... except ConfigError as error:
    ...     print(error)  # doctest: +ELLIPSIS
    invalid training config: data.train: no training shards, ... (data.train, data.fields, \
model.objective.name); set it to a shard pattern, directory or list
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from mmalign.config import Config
from mmalign.data.sources import resolve_sources
from mmalign.errors import problems_error
from mmalign.training.parallel import strategy_problems


def _shard_problems(config: Config) -> list[str]:
    problems = []
    if config.data.train is None:
        problems.append(
            "data.train: no training shards; set it to a shard pattern, directory or list"
        )
    for split in ("train", "val"):
        spec = getattr(config.data, split)
        if spec is not None:
            try:
                resolve_sources(spec, f"data.{split}")
            except (FileNotFoundError, ValueError) as error:
                problems.append(str(error))
    return problems


def _modality_problems(config: Config) -> list[str]:
    modalities = list(config.model.towers)
    problems = [
        f"data.fields: modality '{name}' has no record extension; add e.g. '{name}: <ext>'"
        for name in modalities
        if name not in config.data.fields
    ]
    problems += [
        f"data.fields.{name}: not a modality of model.towers ({', '.join(modalities)})"
        for name in config.data.fields
        if name not in modalities
    ]
    for query, gallery in config.eval.retrieval_pairs or []:
        problems += [
            f"eval.retrieval_pairs: unknown modality '{name}' (known: {', '.join(modalities)})"
            for name in (query, gallery)
            if name not in modalities
        ]
    return problems


def _zeroshot_problems(config: Config) -> list[str]:
    query = config.eval.zeroshot_modality
    if query is None:
        return []
    modalities = list(config.model.towers)
    queries = [query] if isinstance(query, str) else query
    problems = [
        f"eval.zeroshot_modality: unknown modality '{name}' (known: {', '.join(modalities)})"
        for name in queries
        if name not in modalities
    ]
    text = config.eval.zeroshot_text
    texts = config.model.modalities_of_type("text")
    if text is not None and text not in modalities:
        problems.append(f"eval.zeroshot_text: unknown modality '{text}'")
    if text is None and not texts:
        problems.append("eval.zeroshot_text: the model has no text tower to encode class prompts")
    if config.data.classes is None:
        problems.append("data.classes: eval.zeroshot_modality needs a classes.json file")
    elif not Path(config.data.classes).is_file():
        problems.append(f"data.classes: file {config.data.classes} does not exist")
    if config.data.label_field is None:
        problems.append("data.label_field: zero-shot validation needs labels (e.g. 'cls')")
    return problems


def _schedule_problems(config: Config) -> list[str]:
    problems = []
    if config.train.epochs is not None and config.data.epoch_samples is None:
        problems.append("train.epochs: needs data.epoch_samples (samples per epoch)")
    if config.train.epochs is None and config.train.steps is None:
        problems.append("train.steps: set train.steps or train.epochs")
    if config.eval.every and config.data.val is None:
        problems.append("eval.every: periodic validation needs data.val shards")
    if config.data.classes is not None and not Path(config.data.classes).is_file():
        problems.append(f"data.classes: file {config.data.classes} does not exist")
    return problems


def _objective_problems(config: Config) -> list[str]:
    """A training objective needs at least one loss term for the model's towers."""
    objective, modalities = config.model.objective, list(config.model.towers)
    if objective.term_names(modalities):
        return []
    field = "pairs" if getattr(objective, "pairs", None) is not None else "name"
    return [
        f"model.objective.{field}: '{objective.name}' has no loss term for the modalities "
        f"{modalities}, so training would learn nothing; it aligns pairs: add a tower to "
        "model.towers (or list a pair)"
    ]


def memory_bytes() -> int:
    """Memory of the device training runs on: the first GPU's, else the machine's RAM."""
    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _memory_problems(config: Config) -> list[str]:
    """The blockwise objective's reused buffers (``n2`` Symile: products ``[block, dim]`` and
    logits ``[rows, block]`` twice, the most a tile holds: on CPU tiles are far smaller) must
    fit in memory."""
    objective = config.model.objective
    block_size = getattr(objective, "block_size", None)
    if block_size is None or getattr(objective, "negatives", "n2") != "n2":
        return []
    rows = config.data.batch_size * config.train.accumulate
    needed = 4 * block_size * (config.model.dim + 2 * rows)
    available = memory_bytes()
    if needed <= available:
        return []
    return [
        f"model.objective.block_size: {block_size} needs about {needed / 2**30:.3g} GiB of "
        f"block buffers at {rows} rows per step, more than the {available / 2**30:.3g} GiB "
        "of this machine; lower it (the default 16384 is enough for most batches)"
    ]


def check_run_config(config: Config) -> None:
    """Raise one :class:`ConfigError` listing every problem of a training config."""
    problems = (
        _shard_problems(config)
        + _modality_problems(config)
        + _zeroshot_problems(config)
        + _schedule_problems(config)
        + _objective_problems(config)
        + _memory_problems(config)
        + strategy_problems(config)
    )
    if problems:
        unique = list(dict.fromkeys(problems))
        raise problems_error("training config", unique)


def total_steps(config: Config) -> int:
    """Optimizer steps of the run: ``train.steps``, or ``train.epochs`` passes over
    ``data.epoch_samples`` (samples per process and epoch, as the loader counts them) at
    ``batch_size x accumulate`` samples per process and step."""
    steps, epochs, epoch_samples = (
        config.train.steps,
        config.train.epochs,
        config.data.epoch_samples,
    )
    if epochs is None:
        assert steps is not None, "check_run_config: train.steps or train.epochs"
        return steps
    assert epoch_samples is not None, "check_run_config: train.epochs needs data.epoch_samples"
    per_step = config.data.batch_size * config.train.accumulate
    return max(1, math.ceil(epochs * epoch_samples / per_step))
