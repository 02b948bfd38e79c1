"""The options of the ``type: text`` tower (``model.towers.<modality>``), apart from
the tower so a config is checked without importing torch; :mod:`mmalign.towers.text`
documents them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from mmalign.config.tower import TowerConfig
from mmalign.registry import TOWER_OPTIONS

HF_ONLY = ("path", "pooling")
OPEN_CLIP_ONLY = (
    "model",
    "text_cfg",
    "tokenizer",
    "width",
    "heads",
    "layers",
    "embed_dim",
    "quick_gelu",
)


@TOWER_OPTIONS.register("text")
class TextTowerConfig(TowerConfig):
    """Config of ``type: text`` (see :mod:`mmalign.towers.text`)."""

    type: Literal["text"] = "text"
    backend: Literal["open_clip", "hf"] = "open_clip"
    context_length: int | None = None
    checkpoint: str | None = None
    path: str | None = None
    pretrained: bool | str = True
    """backend hf: load the folder's weights (false: random init); backend open_clip:
    ``local-dir:DIR`` or ``hf-hub:ORG/NAME``."""
    pooling: Literal["cls", "mean", "eos"] = "cls"
    model: str | None = None
    text_cfg: dict[str, Any] = Field(default_factory=dict)
    tokenizer: str | None = None
    width: int | None = None
    heads: int | None = None
    layers: int | None = None
    embed_dim: int | None = None
    quick_gelu: bool | None = None

    @model_validator(mode="after")
    def _keys_match_backend(self) -> TextTowerConfig:
        other = OPEN_CLIP_ONLY if self.backend == "hf" else HF_ONLY
        wrong = sorted(key for key in other if key in self.model_fields_set)
        if wrong:
            raise ValueError(f"key(s) {', '.join(wrong)} do not apply to backend {self.backend}")
        if self.backend == "hf" and isinstance(self.pretrained, str):
            raise ValueError("backend hf: `pretrained` is true or false; `path:` names the folder")
        if self.backend == "open_clip" and self.pretrained is False:
            raise ValueError("backend open_clip: `pretrained` is local-dir:DIR or hf-hub:ORG/NAME")
        if self.backend == "hf" and not self.path:
            raise ValueError("backend hf needs `path:` (a local Hugging Face model directory)")
        return self
