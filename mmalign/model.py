"""AlignmentModel: one tower per modality, projections into a shared space, a temperature.

Example:
    >>> from mmalign import AlignmentModel
    >>> model = AlignmentModel.from_config({"dim": 16, "towers": {
    ...     "text": {"type": "text", "width": 32, "heads": 2, "layers": 1, "context_length": 8},
    ...     "labs": {"type": "tabular", "in_features": 3}}})
    >>> model.encode("text", ["a seven", "a three"]).shape
    torch.Size([2, 16])
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from mmalign.batch import Batch, base_modality, move_to
from mmalign.config import Config, ConfigError, ModelConfig, TowerConfig, load_config
from mmalign.embeddings import check_prefix, truncate
from mmalign.errors import config_error
from mmalign.files import naming_errors
from mmalign.objectives import LossOutput, build_objective
from mmalign.objectives.matryoshka import with_matryoshka
from mmalign.objectives.terms import with_terms
from mmalign.towers import Tower, build_tower
from mmalign.towers.lora import merge_lora
from mmalign.towers.pretrained import initial_logit_scale

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def build_projection(kind: str, width: int, dim: int, field: str) -> nn.Module:
    """The map from a tower's ``width`` to the shared ``dim`` (``model.projection``): linear,
    a 2-layer MLP, or none.

    Example:
        >>> build_projection("linear", 48, 16, "model.towers.text")
        Linear(in_features=48, out_features=16, bias=False)
    """
    if kind == "linear":
        return nn.Linear(width, dim, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, dim))
    if width != dim:
        raise ConfigError(
            f"model.projection: 'none' needs every tower's width to equal model.dim ({dim}); "
            f"{field} has width {width}. Use projection 'linear' or set the tower's width"
        )
    return nn.Identity()


def _model_config(source: str | Path | Mapping[str, Any] | Config | ModelConfig) -> ModelConfig:
    if isinstance(source, ModelConfig):
        return source
    if isinstance(source, Mapping) and "model" not in source:
        try:
            return ModelConfig.model_validate(dict(source))
        except ValidationError as error:
            raise config_error(error, "model", "model config") from None
    if isinstance(source, Mapping):
        source = dict(source)
    return load_config(source).model


class AlignmentModel(nn.Module):
    """Towers + per-modality projections to ``dim`` + a learnable temperature.

    Build it with :meth:`from_config` or :meth:`from_pretrained`. Embeddings are
    L2-normalized; :meth:`loss` applies the configured objective with the model's
    ``logit_scale`` (log scale, clamped to ``logit_scale_max`` before ``exp``) and, for the
    sigmoid objective, ``logit_bias`` (``None`` for the others).

    Example:
        >>> model = AlignmentModel.from_config({"dim": 8, "towers": {
        ...     "a": {"type": "tabular", "in_features": 2},
        ...     "b": {"type": "tabular", "in_features": 3}}})
        >>> model.modalities
        ['a', 'b']
    """

    def __init__(self, config: ModelConfig, base_dirs: Mapping[str, Path] | None = None) -> None:
        super().__init__()
        self.config = config
        self.modalities = list(config.towers)
        self.dim = config.dim
        base_dirs = base_dirs or {}
        towers = {name: self._build_tower(name, base_dirs.get(name)) for name in self.modalities}
        # a ModuleDict (registered submodules) that the type checker reads as what it holds
        self.towers = cast("Mapping[str, Tower]", nn.ModuleDict(towers))
        self.projections = nn.ModuleDict(
            {
                name: build_projection(
                    config.projection, self.tower(name).width, config.dim, f"model.towers.{name}"
                )
                for name in self.modalities
            }
        )
        towers = {name: self.tower(name) for name in self.modalities}
        logit_scale = initial_logit_scale(config.logit_scale_init, towers)
        self.config = config = config.model_copy(update={"logit_scale_init": logit_scale})
        self.logit_scale = nn.Parameter(
            torch.tensor(logit_scale), requires_grad=config.learn_logit_scale
        )
        self.objective = with_terms(
            with_matryoshka(
                build_objective(config.objective), config.matryoshka, config.matryoshka_weights
            ),
            config.objective.terms,
            self.modalities,
            config.dim,
        )
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(config.logit_bias_init)))
            if self.objective.learns_bias
            else None
        )
        self._freeze(config.freeze)
        self.train()  # one mode everywhere (Hugging Face loads its models in eval mode)

    def _build_tower(self, name: str, base_dir: Path | None) -> Tower:
        if not name or "." in name or "@" in name:
            raise ConfigError(
                f"model.towers: modality name {name!r} must be non-empty, no '.' or '@'"
            )
        return build_tower(self.config.towers[name], f"model.towers.{name}", base_dir)

    def _freeze(self, frozen: list[str]) -> None:
        unknown = [name for name in frozen if name not in self.towers]
        if unknown:
            raise ConfigError(
                f"model.freeze: unknown modality {', '.join(unknown)}; "
                f"known: {', '.join(self.modalities)}"
            )
        for name in frozen:
            self.towers[name].requires_grad_(False)

    @classmethod
    def from_config(
        cls, config: str | Path | Mapping[str, Any] | Config | ModelConfig
    ) -> AlignmentModel:
        """Build from a YAML path, a whole-run config (dict or :class:`Config`) or its
        ``model`` section (dict or :class:`ModelConfig`).

        Example:
            >>> model = AlignmentModel.from_config({"model": {"dim": 4, "towers": {
            ...     "labs": {"type": "tabular", "in_features": 3}}}})
            >>> model.dim
            4
        """
        if isinstance(config, Config):
            config = config.model
        return cls(_model_config(config))

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return self.logit_scale.device

    def train(self, mode: bool = True) -> AlignmentModel:
        """Set train/eval mode; frozen towers always stay in eval mode (locked tuning)."""
        super().train(mode)
        for name in self.config.freeze:
            self.towers[name].eval()
        return self

    def tower(self, modality: str) -> Tower:
        """The tower of ``modality`` (a ``KeyError`` naming the known ones otherwise).

        Example:
            >>> model = AlignmentModel.from_config({"dim": 4, "towers": {
            ...     "labs": {"type": "tabular", "in_features": 2}}})
            >>> model.tower("labs").width
            128
        """
        if modality not in self.towers:
            raise KeyError(
                f"unknown modality {modality!r}; this model knows {', '.join(self.modalities)}"
            )
        return self.towers[modality]

    def embed(self, modality: str, inputs: Any) -> torch.Tensor:
        """Collated inputs of one modality to L2-normalized ``[B, dim]`` embeddings (a second
        view ``graph@view2`` goes through the tower of ``graph``)."""
        modality = base_modality(modality)
        features = self.tower(modality)(inputs)
        return F.normalize(self.projections[modality](features), dim=-1)

    def forward(
        self, inputs: Mapping[str, Any] | Batch, present: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Embed each modality in ``inputs`` (already collated), or every modality of a
        :class:`~mmalign.batch.Batch` (on the model's device).

        Without ``present`` every ``inputs[m]`` holds the whole batch. With ``present``
        (bool ``[B, M]``, columns in ``inputs``' key order) ``inputs[m]`` holds only the rows
        where ``present[:, j]`` is true (``None`` when no row has it); the result has ``B``
        rows per modality, zero where absent.
        """
        if isinstance(inputs, Batch):
            if present is not None:
                raise ValueError("a Batch carries its own present mask; do not pass `present`")
            batch = inputs
            item_index = batch.item_index
            inputs, present = batch.inputs, batch.present_for(list(batch.inputs))
        else:
            item_index = {}
        for modality in inputs:
            self.tower(base_modality(modality))
        if present is None:
            embedded = {modality: self._embed_all(modality, x) for modality, x in inputs.items()}
            rows = {modality: value.shape[0] for modality, value in embedded.items()}
            if len(set(rows.values())) > 1:
                raise ValueError(
                    f"inputs hold different batch sizes per modality {rows}; without `present` "
                    "every modality needs one row per sample (pass `present` for absent rows)"
                )
            return embedded
        if present.dtype != torch.bool or present.ndim != 2 or present.shape[1] != len(inputs):
            raise ValueError(
                f"present must be a bool tensor [B, {len(inputs)}] (one column per modality "
                f"in inputs: {', '.join(inputs)}); got {present.dtype} {tuple(present.shape)}"
            )
        return {
            modality: self._scatter(modality, x, present[:, column], item_index.get(modality))
            for column, (modality, x) in enumerate(inputs.items())
        }

    def _embed_all(self, modality: str, inputs: Any) -> torch.Tensor:
        if inputs is None:
            raise ValueError(f"inputs[{modality!r}] is None; pass `present` to mark absent rows")
        return self.embed(modality, inputs)

    def _scatter(
        self, modality: str, inputs: Any, rows: torch.Tensor, item_index: torch.Tensor | None
    ) -> torch.Tensor:
        index = rows.nonzero().squeeze(1).to(self.device)
        out = torch.zeros(rows.shape[0], self.dim, device=self.device)
        if index.numel() == 0:
            return out
        if inputs is None:
            raise ValueError(
                f"present marks {index.numel()} rows of {modality!r} but inputs has None"
            )
        embedded = self.embed(modality, inputs)
        if item_index is not None:  # rows of one record share one encoded item
            embedded = embedded[item_index.to(self.device)]
        if embedded.shape[0] != index.numel():
            raise ValueError(
                f"inputs[{modality!r}] has {embedded.shape[0]} rows but present marks "
                f"{index.numel()}; inputs must hold exactly the present rows, in batch order"
            )
        return out.to(embedded.dtype).index_copy(0, index, embedded)

    def truncate(self, embeddings: torch.Tensor, dim: int | None) -> torch.Tensor:
        """The first ``dim`` coordinates renormalized (``None``: unchanged); warns when ``dim``
        is not a trained Matryoshka prefix (``model.matryoshka``).

        Example:
            >>> model = AlignmentModel.from_config({"dim": 4, "matryoshka": [2, 4], "towers": {
            ...     "labs": {"type": "tabular", "in_features": 2}}})
            >>> model.truncate(torch.tensor([[3.0, 4.0, 1.0, 1.0]]), 2).tolist()
            [[0.6000000238418579, 0.800000011920929]]
        """
        if dim is None:
            return embeddings
        check_prefix(dim, self.dim, self.config.matryoshka)
        return truncate(embeddings, dim)

    @torch.no_grad()
    def encode(
        self, modality: str, raws: Iterable[Any], batch_size: int = 64, dim: int | None = None
    ) -> torch.Tensor:
        """Raw samples of one modality to normalized ``[N, dim]`` embeddings (eval mode, no
        augmentation, no grad, in batches of ``batch_size``); ``dim`` keeps the first ``dim``
        coordinates, renormalized (:meth:`truncate`).

        Example:
            >>> model = AlignmentModel.from_config({"dim": 4, "towers": {
            ...     "labs": {"type": "tabular", "in_features": 2}}})
            >>> model.encode("labs", [[0.0, 1.0], [2.0, 3.0]]).shape
            torch.Size([2, 4])
        """
        tower = self.tower(modality)
        samples = _as_sample_list(modality, raws)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        was_training = self.training
        if was_training:
            self.eval()
        try:
            chunks = [
                self.embed(modality, self._collate(tower, samples[start : start + batch_size]))
                for start in range(0, len(samples), batch_size)
            ]
        finally:
            if was_training:
                self.train()
        return self.truncate(torch.cat(chunks), dim)

    def _collate(self, tower: Tower, samples: list[Any]) -> Any:
        inputs = tower.collate([tower.preprocess(sample) for sample in samples])
        return move_to(inputs, self.device)

    def logit_scale_value(self) -> torch.Tensor:
        """The multiplier passed to the objective: ``exp(min(logit_scale, logit_scale_max))``."""
        return self.logit_scale.clamp(max=self.config.logit_scale_max).exp()

    def loss(
        self,
        embeddings: Mapping[str, torch.Tensor],
        present: torch.Tensor | Batch | None = None,
        generator: torch.Generator | None = None,
        groups: torch.Tensor | None = None,
    ) -> LossOutput:
        """The configured objective on ``embeddings``; ``present`` is a bool ``[B, M]`` whose
        columns follow ``embeddings``' keys, or the :class:`~mmalign.batch.Batch` they came
        from (its mask is taken by modality name and its ``groups`` are used)."""
        if isinstance(present, Batch):
            groups = present.groups if groups is None else groups
            present = present.present_for(list(embeddings))
        return self.objective(
            dict(embeddings),
            self.logit_scale_value(),
            self.logit_bias,
            present=present,
            generator=generator,
            groups=groups,
        )

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json``, ``model.safetensors`` and each tower's side files
        (``<directory>/<modality>/``), LoRA adapters merged where a tower says
        ``merge_lora``; returns the directory.

        Example:
            >>> import tempfile
            >>> model = AlignmentModel.from_config({"dim": 4, "towers": {
            ...     "labs": {"type": "tabular", "in_features": 2}}})
            >>> saved = model.save_pretrained(tempfile.mkdtemp())
            >>> AlignmentModel.from_pretrained(saved).dim
            4
        """
        if any(self.tower(name).config.merge_lora for name in self.modalities):
            return self._with_lora_merged().save_pretrained(directory)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        towers = {name: self._save_tower_files(name, directory) for name in self.modalities}
        config = self.config.model_copy(update={"towers": towers})
        (directory / CONFIG_FILE).write_text(config.model_dump_json(indent=2) + "\n")
        with naming_errors(directory / WEIGHTS_FILE):
            save_model(self, str(directory / WEIGHTS_FILE))
        return directory

    def _save_tower_files(self, name: str, directory: Path) -> TowerConfig:
        tower_dir = directory / name
        tower_dir.mkdir(exist_ok=True)
        updates = self.tower(name).save_files(tower_dir)
        if not any(tower_dir.iterdir()):
            tower_dir.rmdir()
        config = self.config.towers[name]
        return type(config).model_validate({**config.model_dump(), **updates})

    def _with_lora_merged(self) -> AlignmentModel:
        """A deep copy whose towers with ``merge_lora`` hold their adapters merged, configured
        without ``lora`` (what ``save_pretrained`` writes, so the saved model loads without
        peft); ``self`` is unchanged."""
        merged = copy.deepcopy(self)
        configs = dict(merged.config.towers)
        for name in merged.modalities:
            tower = merged.tower(name)
            if tower.config.merge_lora:
                merge_lora(tower)
                tower.config = configs[name] = tower.config.model_copy(
                    update={"lora": None, "merge_lora": False}
                )
        merged.config = merged.config.model_copy(update={"towers": configs})
        return merged

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device = "cpu"
    ) -> AlignmentModel:
        """Load a model written by :meth:`save_pretrained` (in eval mode): its directory,
        or a run directory holding it as ``model/`` (what every ``mmalign`` command takes)."""
        directory = Path(directory)
        if not (directory / WEIGHTS_FILE).is_file() and (directory / "model").is_dir():
            directory = directory / "model"
        weights, config_file = directory / WEIGHTS_FILE, directory / CONFIG_FILE
        for needed in (config_file, weights):
            if not needed.is_file():
                raise FileNotFoundError(
                    f"{directory} is not a saved mmalign model: {needed.name} is missing "
                    f"({directory}); {_model_todo(directory)}" + _pickle_note(directory)
                )
        config = _saved_config(config_file)
        model = cls(config, base_dirs={name: directory / name for name in config.towers})
        try:
            missing, unexpected = load_model(model, weights, strict=False)
        except (SafetensorError, RuntimeError) as error:  # not safetensors, or shapes differ
            raise ValueError(
                f"cannot load {weights} into the model of {config_file}: "
                f"{str(error).rstrip('.')}. The weights "
                "must be a safetensors file written for this config (save_pretrained)"
            ) from None
        if missing or unexpected:
            raise ValueError(
                f"{weights} does not match {config_file}: missing {sorted(missing)[:8]}, "
                f"unexpected {sorted(unexpected)[:8]}"
            )
        return model.to(device).eval()

    def parameter_counts(self) -> dict[str, tuple[int, int]]:
        """``(trainable, total)`` parameters per tower, per projection and in all."""
        groups: dict[str, nn.Module] = {f"tower/{k}": v for k, v in self.towers.items()}
        groups.update({f"projection/{k}": v for k, v in self.projections.items()})
        counts = {name: _count(module.parameters()) for name, module in groups.items()}
        counts["total"] = _count(self.parameters())
        return counts

    def summary(self) -> str:
        """A readable table: each modality's tower type, width and parameter counts."""
        counts = self.parameter_counts()
        log_scale = self.logit_scale.item()
        scale = math.exp(min(log_scale, self.config.logit_scale_max))
        bias = "" if self.logit_bias is None else f", logit_bias={self.logit_bias.item():.3f}"
        lines = [
            f"AlignmentModel(dim={self.dim}, objective={self.config.objective.name}, "
            f"projection={self.config.projection}, "
            f"logit_scale=exp({log_scale:.3f})={scale:.2f}{bias})",
            f"  {'modality':<14}{'type':<9}{'width':>7}{'tower trainable/total':>26}"
            f"{'projection':>14}",
        ]
        for name, tower in self.towers.items():
            trainable, total = counts[f"tower/{name}"]
            projection = counts[f"projection/{name}"][1]
            frozen = "  frozen" if name in self.config.freeze else ""
            lines.append(
                f"  {name:<14}{tower.config.type:<9}{tower.width:>7}"
                f"{f'{trainable:,}/{total:,}':>26}{projection:>14,}{frozen}"
            )
        trainable, total = counts["total"]
        lines.append(f"  parameters: {trainable:,} trainable / {total:,} total")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


def _count(parameters: Iterable[nn.Parameter]) -> tuple[int, int]:
    unique = {id(p): p for p in parameters}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


def _as_sample_list(modality: str, raws: Iterable[Any]) -> list[Any]:
    if isinstance(raws, str | bytes | Mapping | Image.Image) or not isinstance(raws, Iterable):
        raise TypeError(
            f"encode({modality!r}, raws): raws must be a list of samples, got a "
            f"{type(raws).__name__}; wrap one sample in a list"
        )
    samples = list(raws)
    if not samples:
        raise ValueError(f"encode({modality!r}, raws): raws is empty; pass at least one sample")
    return samples


def _saved_config(config_file: Path) -> ModelConfig:
    """The validated ``config.json`` of a saved model; a one-line :class:`ConfigError` naming
    the file when it is no JSON, nested too deep to read, or no valid model config."""
    todo = "save the model again (AlignmentModel.save_pretrained), or pass another model"
    try:
        data = json.loads(config_file.read_text())
        return ModelConfig.model_validate(data)
    except ValidationError as error:
        raise config_error(error, "", "model config", str(config_file)) from None
    except RecursionError:
        problem = "is nested too deeply to read"
    except ValueError as error:  # not JSON, not UTF-8
        problem = f"is not valid JSON: {error}"
    raise ConfigError(f"the model config {problem} ({config_file}); {todo}") from None


def _model_todo(directory: Path) -> str:
    """What to pass instead of ``directory``, which holds no saved model."""
    if (directory / "trainer.json").is_file():  # a training checkpoint (run/checkpoints/...)
        return (
            f"a training checkpoint is not a saved model: pass the run directory "
            f"{directory.parent.parent} (its model/), or resume the run to save one"
        )
    return "pass the output of AlignmentModel.save_pretrained (config.json + model.safetensors)"


def _pickle_note(directory: Path) -> str:
    """A hint when ``directory`` holds pickled checkpoints, which are never loaded."""
    found = sorted(p.name for p in directory.glob("*") if p.suffix in PICKLE_SUFFIXES)
    if not found:
        return ""
    return (
        f"; found {', '.join(found)}, which mmalign does not load: pickled checkpoints can run "
        "code when opened. Load trusted tower weights through the tower's `checkpoint:` field "
        "(read with weights_only=True), then save_pretrained"
    )
