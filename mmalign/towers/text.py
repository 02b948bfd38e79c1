"""The text tower: a Hugging Face encoder or open_clip's text transformer.

Config (``type: text``):

- ``backend: hf``: ``path`` to a local Hugging Face model directory (``AutoModel`` +
  ``AutoTokenizer``); ``pooling`` is ``cls`` (first token), ``mean`` (over real tokens) or
  ``eos`` (last real token); ``pretrained: false`` builds the architecture from the
  directory's config with random weights (saved models use this: their weights live in
  ``model.safetensors``).
- ``backend: open_clip`` (default): open_clip's ``TextTransformer``, configured by a ``model``
  name (its ``text_cfg`` and ``embed_dim``) and/or a ``text_cfg`` dict (``CLIPTextCfg``
  fields); ``width``, ``heads`` and ``layers`` are shorthands for the ``text_cfg`` keys. The
  tokenizer is open_clip's bundled BPE ``SimpleTokenizer``, or ``tokenizer:`` a SentencePiece
  ``.model`` file whose vocabulary sizes the embedding table (multilingual captions; pooling
  at its end-of-sentence token). ``embed_dim`` is the output width (default: the named
  model's; none: the transformer width, without open_clip's text projection). ``checkpoint``
  loads a local open_clip checkpoint's text weights; ``pretrained: local-dir:DIR`` or
  ``hf-hub:ORG/NAME`` (from the local Hugging Face cache) takes architecture and weights of a
  whole open_clip model (:mod:`mmalign.towers.pretrained`).
- ``context_length``: tokens per caption (longer ones are truncated); default: the open_clip
  config's (77), or the Hugging Face tokenizer's maximum. The open_clip transformer encodes
  a batch only up to its longest caption's end-of-text token: it is causal and pools there
  (``pool_type`` ``argmax`` or ``eos``), so the padding after it changes no output or
  gradient, and short captions cost a fraction of the full context. Other poolings,
  class-token and padding-mask towers, tracing and ONNX export keep the full context.

Example:
    >>> from mmalign.towers import build_tower
    >>> tower = build_tower({"type": "text", "width": 32, "heads": 2, "layers": 1,
    ...     "context_length": 16}, field="model.towers.text")
    >>> tower(tower.collate([tower.preprocess("a handwritten seven")])).shape
    torch.Size([1, 32])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import sentencepiece
import torch
import transformers
from open_clip.model import CLIPTextCfg, _build_text_tower
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from mmalign.config import ConfigError
from mmalign.towers.base import HFParts, Tower, register_tower
from mmalign.towers.grad_checkpointing import library_checkpointing
from mmalign.towers.image import dataclass_from_dict
from mmalign.towers.options.text import TextTowerConfig
from mmalign.towers.pretrained import (
    checkpoint_logit_scale,
    compact_config,
    named_or_pretrained_config,
)


@register_tower("text")
class TextTower(Tower):
    """Text encoder with its tokenizer (see the module docstring)."""

    config_class = TextTowerConfig
    config: TextTowerConfig
    onnx_input = "input_ids"

    def __init__(
        self, config: TextTowerConfig, field: str = "tower", base_dir: Path | None = None
    ) -> None:
        super().__init__(config, field, base_dir)
        backend = HFText if config.backend == "hf" else OpenCLIPText
        self.encoder = backend(self)
        self.width = self.encoder.width
        key, path = "checkpoint", config.checkpoint
        if path is None and self.encoder.pretrained_checkpoint is not None:
            key, path = "pretrained", self.encoder.pretrained_checkpoint
        if path:
            state = self.read_checkpoint(path, key)
            file = str(self.resolve_path(path).resolve())
            self.pretrained_logit_scale = checkpoint_logit_scale(state, file)
            self.load_weights(self.encoder.module, self.encoder.checkpoint_state(state), key)

    def preprocess(self, raw: Any, augment: bool = False) -> Any:
        """One caption (``str``) to token ids, truncated to ``context_length`` (no
        augmentation)."""
        if not isinstance(raw, str):
            raise TypeError(f"{self.field}: text tower expects a str, got {type(raw).__name__}")
        return self.encoder.tokenize(raw)

    def collate(self, items: Sequence[Any]) -> Any:
        """Token ids of several captions to one padded batch."""
        if not items:
            raise ValueError(f"{self.field}: cannot collate an empty list of captions")
        return self.encoder.collate(list(items))

    def forward(self, inputs: Any) -> torch.Tensor:
        """A collated batch to ``[B, width]`` features."""
        return self.encoder(inputs)

    def enable_gradient_checkpointing(self) -> bool:
        """open_clip's or transformers' own switch."""
        return library_checkpointing(self)

    def example_raw(self) -> Any:
        """A caption."""
        return "a photo of the number seven"

    def onnx_axes(self, names: Sequence[str]) -> dict[str, dict[int, str]]:
        """The batch axis, and the token axis of a Hugging Face tokenizer's output."""
        if self.config.backend == "hf":
            return {name: {0: "batch", 1: "tokens"} for name in names}
        return super().onnx_axes(names)

    def hf_parts(self) -> HFParts | None:
        """``backend: hf``: the ``AutoModel``, its tokenizer and the pooling."""
        encoder = self.encoder
        if not isinstance(encoder, HFText):
            return None
        return HFParts(encoder.module, encoder.tokenizer, encoder.pooling)

    def save_files(self, directory: Path) -> dict[str, Any]:
        """Copy the tokenizer (and a Hugging Face config) into ``directory``."""
        return {"checkpoint": None, **self.encoder.save_files(directory)}


class HFText(nn.Module):
    """A Hugging Face ``AutoModel`` encoder with its ``AutoTokenizer`` and pooling."""

    def __init__(self, tower: TextTower) -> None:
        super().__init__()
        config = tower.config
        path = tower.resolve_path(config.path or "")
        if not path.is_dir():
            raise ConfigError(
                f"{tower.field}.path: {path} is not a directory; point it at a local Hugging "
                "Face model directory (config.json, weights and tokenizer files)"
            )
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            if config.pretrained:
                self.module = transformers.AutoModel.from_pretrained(path, local_files_only=True)
            else:
                hf_config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
                self.module = transformers.AutoModel.from_config(hf_config)
        except (OSError, ValueError) as error:
            raise ConfigError(f"{tower.field}.path: cannot load {path}: {error}") from error
        self.pooling = config.pooling
        self.pretrained_checkpoint = None
        self.width = int(self.module.config.hidden_size)
        self.context_length = config.context_length or self._max_length()

    def _max_length(self) -> int:
        limits = [getattr(self.module.config, "max_position_embeddings", None)]
        limits.append(self.tokenizer.model_max_length)
        return int(min(limit for limit in limits if limit and limit < 1_000_000))

    def checkpoint_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, truncation=True, max_length=self.context_length)["input_ids"]

    def collate(self, items: list[list[int]]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer.pad({"input_ids": items}, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = inputs["attention_mask"]
        hidden = self.module(input_ids=inputs["input_ids"], attention_mask=mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "mean":
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        last = _last_real_index(mask)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def save_files(self, directory: Path) -> dict[str, Any]:
        self.tokenizer.save_pretrained(directory)
        self.module.config.save_pretrained(directory)
        return {"path": ".", "pretrained": False}


def _last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token per row (works for left and right padding)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).amax(dim=1)


class OpenCLIPText(nn.Module):
    """open_clip's ``TextTransformer`` with the BPE or a SentencePiece tokenizer."""

    def __init__(self, tower: TextTower) -> None:
        super().__init__()
        config = tower.config
        self.field = tower.field
        pretrained = config.pretrained if isinstance(config.pretrained, str) else None
        named, source = named_or_pretrained_config(
            config.model, pretrained, tower.field, tower.base_dir
        )
        self.pretrained_checkpoint = None
        if source is not None:
            if source.checkpoint is None:
                raise ConfigError(
                    f"{tower.field}.pretrained: {source.directory} holds no open_clip checkpoint "
                    "(open_clip_model.safetensors, open_clip_pytorch_model.bin, ...)"
                )
            self.pretrained_checkpoint = str(source.checkpoint)
        values = {**named.get("text_cfg", {}), **config.text_cfg}
        shorthands = {"width": config.width, "heads": config.heads, "layers": config.layers}
        values.update({key: value for key, value in shorthands.items() if value is not None})
        if config.context_length is not None:
            values["context_length"] = config.context_length
        self.sentencepiece = None
        if config.tokenizer:
            self.sentencepiece = self._load_sentencepiece(tower.resolve_path(config.tokenizer))
            values.update(_sentencepiece_cfg(self.sentencepiece))
        text_cfg = dataclass_from_dict(CLIPTextCfg, values, f"{tower.field}.text_cfg")
        embed_dim = config.embed_dim or named.get("embed_dim")
        if not embed_dim:
            text_cfg.proj_type = "none"
        self.context_length = text_cfg.context_length
        self.tokenizer = (
            None if self.sentencepiece else SimpleTokenizer(context_length=self.context_length)
        )
        self._check(text_cfg)
        self.text_cfg = text_cfg
        self.quick_gelu = bool(
            named.get("quick_gelu", False) if config.quick_gelu is None else config.quick_gelu
        )
        self.module = _build_text_tower(
            embed_dim or text_cfg.width, text_cfg, quick_gelu=self.quick_gelu
        )
        self.module.transformer.register_forward_pre_hook(_causal_mask_to_length, with_kwargs=True)
        projected = self.module.text_projection is not None
        self.width = int(embed_dim) if projected and embed_dim else text_cfg.width
        self.resolve_on_save = bool(config.model or pretrained)

    def _load_sentencepiece(self, path: Path) -> sentencepiece.SentencePieceProcessor:
        if not path.is_file():
            raise ConfigError(
                f"{self.field}.tokenizer: SentencePiece model {path} does not exist; train one "
                "with sentencepiece.SentencePieceTrainer and point at its .model file"
            )
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.Load(str(path))
        except (OSError, RuntimeError) as error:
            raise ConfigError(f"{self.field}.tokenizer: cannot load {path}: {error}") from error
        if processor.eos_id() < 0:
            raise ConfigError(
                f"{self.field}.tokenizer: {path} has no end-of-sentence piece (eos_id=-1); "
                "train it with an eos_id, the pooled token"
            )
        return processor

    def _check(self, text_cfg: CLIPTextCfg) -> None:
        if text_cfg.hf_model_name or (text_cfg.hf_tokenizer_name and not self.sentencepiece):
            raise ConfigError(
                f"{self.field}: this open_clip text config uses a Hugging Face model or "
                "tokenizer; use `backend: hf` with a local `path:`, or give `tokenizer:`"
            )
        if self.tokenizer is not None and text_cfg.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(
                f"{self.field}.text_cfg.vocab_size: {text_cfg.vocab_size} is smaller than the "
                f"BPE tokenizer's vocabulary ({self.tokenizer.vocab_size}); remove it or give a "
                "SentencePiece `tokenizer:`"
            )

    def checkpoint_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if any(name.startswith("text.") for name in state):
            prefix = "text."
            return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        skipped = ("visual.", "logit_scale", "logit_bias")
        return {k: v for k, v in state.items() if not k.startswith(skipped)}

    def tokenize(self, text: str) -> torch.Tensor:
        if self.tokenizer is not None:
            return self.tokenizer(text)[0]
        processor = cast(sentencepiece.SentencePieceProcessor, self.sentencepiece)  # set then
        ids = [*processor.encode(text)[: self.context_length - 1], processor.eos_id()]
        padded = torch.full((self.context_length,), max(processor.pad_id(), 0), dtype=torch.long)
        padded[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        return padded

    def collate(self, items: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(items)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.module(self._without_trailing_padding(inputs))

    def _trims_padding(self) -> bool:
        """Whether the positions after the last pooled token cannot change an output: a
        causal transformer pooling at the end-of-text token (``argmax`` or ``eos``), without
        an appended class token or padding mask, returning no per-token outputs."""
        module = self.module
        return (
            module.attn_mask is not None
            and module.cls_emb is None
            and not module.use_pad_mask
            and not module.output_tokens
            and module.pool_type in ("argmax", "eos")
        )

    def _without_trailing_padding(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs[:, :L]``, L = one past the batch's last pooled position (the longest
        caption's end-of-text token): the same pooled outputs and gradients, without the
        cost of the padding. Tracing, ONNX export and ``torch.compile`` keep the full
        context (``L`` depends on the data: a compiled forward would break its graph there
        and recompile for every new length)."""
        whole = (
            torch.jit.is_tracing()
            or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_compiling()
        )
        if whole or not inputs.shape[0] or not self._trims_padding():
            return inputs
        if self.module.pool_type == "argmax":
            pooled_at = inputs.argmax(dim=-1)
        else:
            pooled_at = (inputs == self.module.eos_id).int().argmax(dim=-1)
        return inputs[:, : int(pooled_at.max()) + 1]

    def save_files(self, directory: Path) -> dict[str, Any]:
        updates = self._resolved_config() if self.resolve_on_save else {}
        if self.sentencepiece is None:
            return updates
        (directory / "tokenizer.model").write_bytes(self.sentencepiece.serialized_model_proto())
        return {**updates, "tokenizer": "tokenizer.model"}

    def _resolved_config(self) -> dict[str, Any]:
        """The architecture a model name or ``pretrained:`` folder resolved to, so a saved
        model loads without the folder or a registered open_clip name."""
        shorthands = ("width", "heads", "layers", "context_length")
        return {
            "model": None,
            "pretrained": True,
            "text_cfg": compact_config(self.text_cfg),
            "embed_dim": None if self.module.text_projection is None else self.width,
            "quick_gelu": self.quick_gelu,
            **dict.fromkeys(shorthands),
        }


def _causal_mask_to_length(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Forward pre-hook of open_clip's ``Transformer``: cut a ``[n_ctx, n_ctx]`` causal mask
    to the length of a shorter (trimmed) batch ``[B, L, width]``. open_clip's ``TextTransformer``
    passes its whole causal-mask buffer unless it builds a padding mask; the cut reads only
    the call's own tensors, so concurrent forwards do not interfere."""
    mask = kwargs.get("attn_mask")
    if not args or mask is None or mask.dim() != 2 or mask.shape[0] == args[0].shape[1]:
        return None
    length = args[0].shape[1]
    return args, {**kwargs, "attn_mask": mask[:length, :length]}


def _sentencepiece_cfg(processor: sentencepiece.SentencePieceProcessor) -> dict[str, Any]:
    """The text config a SentencePiece model sets: its vocabulary and special ids."""
    return {
        "vocab_size": processor.get_piece_size(),
        "pool_type": "eos",
        "eos_id": processor.eos_id(),
        "pad_id": max(processor.pad_id(), 0),
    }
