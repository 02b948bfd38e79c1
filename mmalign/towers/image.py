"""The image tower: any open_clip vision encoder (ViT, ModifiedResNet, ConvNeXt/timm).

Config (``type: image``):

- ``model``: an open_clip model name (``ViT-B-32``, ``RN50``, ``convnext_tiny``, ...; see
  ``open_clip.list_models()``); its ``vision_cfg`` and ``embed_dim`` are the starting point.
  Built without pretrained weights; nothing downloads.
- ``vision_cfg``: fields of open_clip's ``CLIPVisionCfg`` that override the named model's (or
  define the whole encoder when ``model`` is omitted), e.g. ``{image_size: 32, patch_size: 8,
  width: 64, layers: 2}``; ``timm_model_name`` picks any timm backbone.
- ``image_size``: shorthand for ``vision_cfg.image_size`` (also the preprocessing size).
- ``embed_dim``: the tower's output width (open_clip's ``embed_dim``); defaults to the named
  model's. Required when ``model`` is omitted.
- ``checkpoint``: a local open_clip checkpoint (full CLIP or visual-only state dict,
  ``.safetensors`` or a torch file read with ``weights_only=True``).
- ``pretrained``: a whole open_clip model, ``local-dir:DIR`` or ``hf-hub:ORG/NAME`` from the
  local Hugging Face cache (:mod:`mmalign.towers.pretrained`): architecture, preprocessing and
  weights come from its ``open_clip_config.json`` and checkpoint (``vision_cfg``,
  ``preprocess`` and ``checkpoint`` still override them).
- ``preprocess``: open_clip ``PreprocessCfg`` fields (``mean``, ``std``, ``interpolation``,
  ``resize_mode``, ``fill_color``); ``augmentation``: open_clip ``AugmentationCfg`` fields used
  by the train-time transform (``preprocess(raw, augment=True)``).

Raw samples: a PIL image, a numpy array (HxW gray, HxWx1, HxWx3, HxWx4; uint8, bool or floats
in [0, 1]), a file path, or encoded bytes. Grayscale and RGBA become RGB.

Example:
    >>> from mmalign.towers import build_tower
    >>> tower = build_tower({"type": "image", "embed_dim": 32, "vision_cfg": {"image_size": 32,
    ...     "patch_size": 8, "width": 64, "layers": 2}}, field="model.towers.image")
    >>> import numpy as np
    >>> tower(tower.collate([tower.preprocess(np.zeros((40, 50, 3), np.uint8))])).shape
    torch.Size([1, 32])
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transform import (
    AugmentationCfg,
    PreprocessCfg,
    image_transform_v2,
    merge_preprocess_dict,
)
from PIL import Image, UnidentifiedImageError

from mmalign.config import ConfigError
from mmalign.towers.base import Tower, register_tower, running_batch_norm
from mmalign.towers.grad_checkpointing import library_checkpointing
from mmalign.towers.layout import Block
from mmalign.towers.options.image import ImageTowerConfig
from mmalign.towers.pretrained import (
    PretrainedSource,
    checkpoint_logit_scale,
    compact_config,
    named_or_pretrained_config,
)


def dataclass_from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    """Build an open_clip config dataclass, naming unknown keys and the valid ones."""
    known = {item.name for item in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
        )
    return cls(**values)


def to_rgb(raw: Any) -> Image.Image:
    """One raw image (PIL, numpy array, path or encoded bytes) as an RGB PIL image."""
    if isinstance(raw, Image.Image):
        image = raw
    elif isinstance(raw, np.ndarray):
        image = _array_to_image(raw)
    elif isinstance(raw, str | Path):
        image = _open_image(raw, f"image file {raw}")
    elif isinstance(raw, bytes | bytearray | memoryview):
        image = _open_image(io.BytesIO(bytes(raw)), "encoded image bytes")
    else:
        raise TypeError(
            f"image tower got a {type(raw).__name__}; expected a PIL image, a numpy array "
            "(HxW, HxWx3 or HxWx4), a file path or encoded image bytes"
        )
    return image if image.mode == "RGB" else image.convert("RGB")


def _open_image(source: Any, what: str) -> Image.Image:
    try:
        with Image.open(source) as image:
            image.load()
            return image
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"cannot read {what}: {error}") from error


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(
            f"image array of shape {array.shape} is not an image; expected HxW (gray), "
            "HxWx3 (RGB) or HxWx4 (RGBA), channels last"
        )
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if array.size and (np.nanmin(array) < 0.0 or np.nanmax(array) > 1.0):
            raise ValueError("float image arrays must hold values in [0, 1]; use uint8 for 0..255")
        array = np.round(array * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"image array dtype {array.dtype} unsupported; use uint8 or floats")
    return Image.fromarray(np.ascontiguousarray(array))


@register_tower("image")
class ImageTower(Tower):
    """open_clip vision encoder with open_clip's preprocessing (see the module docstring)."""

    config_class = ImageTowerConfig
    config: ImageTowerConfig
    onnx_input = "pixel_values"

    def __init__(
        self, config: ImageTowerConfig, field: str = "tower", base_dir: Path | None = None
    ) -> None:
        super().__init__(config, field, base_dir)
        named, source = named_or_pretrained_config(config.model, config.pretrained, field, base_dir)
        self.vision_cfg = self._vision_cfg(named.get("vision_cfg", {}))
        self.width = self._embed_dim(named)
        self.quick_gelu = bool(
            named.get("quick_gelu", False) if config.quick_gelu is None else config.quick_gelu
        )
        self.visual = _build_vision_tower(self.width, self.vision_cfg, quick_gelu=self.quick_gelu)
        self.preprocess_cfg = self._preprocess_cfg(source)
        self.eval_transform, self.train_transform = self._transforms(self.preprocess_cfg)
        self._load_checkpoint(source)

    def _load_checkpoint(self, source: PretrainedSource | None) -> None:
        key, path = "checkpoint", self.config.checkpoint
        if path is None and source is not None:
            key, path = "pretrained", str(source.checkpoint or "")
            if source.checkpoint is None:
                raise ConfigError(
                    f"{self.field}.pretrained: {source.directory} holds no open_clip checkpoint "
                    "(open_clip_model.safetensors, open_clip_pytorch_model.bin, ...)"
                )
        if path:
            state = self.read_checkpoint(path, key)
            file = str(self.resolve_path(path).resolve())
            self.pretrained_logit_scale = checkpoint_logit_scale(state, file)
            self.load_weights(self.visual, visual_state(state), key)

    def _vision_cfg(self, base: dict[str, Any]) -> CLIPVisionCfg:
        values = {**base, **self.config.vision_cfg}
        if self.config.image_size is not None:
            values["image_size"] = self.config.image_size
        vision = dataclass_from_dict(CLIPVisionCfg, values, f"{self.field}.vision_cfg")
        if vision.timm_model_pretrained:
            raise ConfigError(
                f"{self.field}.vision_cfg.timm_model_pretrained: would download weights; "
                "set it to false and give a local `checkpoint:` instead"
            )
        return vision

    def _embed_dim(self, named: dict[str, Any]) -> int:
        embed_dim = self.config.embed_dim or named.get("embed_dim")
        if not embed_dim:
            raise ConfigError(
                f"{self.field}.embed_dim: set the output width of the vision tower "
                "(or name an open_clip `model:` whose embed_dim is used)"
            )
        return int(embed_dim)

    def _preprocess_cfg(self, source: PretrainedSource | None) -> PreprocessCfg:
        values = {"size": self.vision_cfg.image_size}
        if source is not None:
            values = merge_preprocess_dict(values, source.preprocess_cfg)
            values["size"] = self.vision_cfg.image_size
        values.update(self.config.preprocess)
        return dataclass_from_dict(PreprocessCfg, values, f"{self.field}.preprocess")

    def _transforms(self, preprocess: PreprocessCfg) -> tuple[Callable, Callable]:
        augmentation = dataclass_from_dict(
            AugmentationCfg, self.config.augmentation, f"{self.field}.augmentation"
        )
        return (
            image_transform_v2(preprocess, is_train=False),
            image_transform_v2(preprocess, is_train=True, aug_cfg=augmentation),
        )

    def preprocess(self, raw: Any, augment: bool = False) -> torch.Tensor:
        """One raw image to a normalized ``[3, H, W]`` tensor (``augment``: the train-time
        transform)."""
        transform = self.train_transform if augment else self.eval_transform
        return transform(to_rgb(raw))

    def collate(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        """Stack preprocessed images into ``[B, 3, H, W]``."""
        if not items:
            raise ValueError(f"{self.field}: cannot collate an empty list of images")
        return torch.stack(list(items))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` images to ``[B, width]`` features (one image in training:
        BatchNorm with running statistics)."""
        with running_batch_norm(self.visual, when=inputs.shape[0] == 1):
            return self.visual(inputs)

    def blocks(self) -> list[Block]:
        """``layer1..layer4`` of open_clip's ModifiedResNet (four stacks of unequal length),
        else the default discovery (the ViT's ``resblocks``, a timm trunk's stages)."""
        if isinstance(self.visual, ModifiedResNet):
            return [[getattr(self.visual, f"layer{index}")] for index in range(1, 5)]
        return super().blocks()

    def enable_gradient_checkpointing(self) -> bool:
        """open_clip's own switch (ViT, timm trunks; not ModifiedResNet)."""
        return library_checkpointing(self)

    def example_raw(self) -> Any:
        """A random 48x40 RGB image."""
        return np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)

    def save_files(self, directory: Path) -> dict[str, Any]:
        """No side files; the weights travel in the model's safetensors file. A tower built
        from a model name or a ``pretrained:`` folder saves the resolved architecture and
        preprocessing, so the saved model loads without the folder or a registered name."""
        if not (self.config.model or self.config.pretrained):
            return {"checkpoint": None}
        return {
            "checkpoint": None,
            "model": None,
            "pretrained": None,
            "image_size": None,
            "vision_cfg": compact_config(self.vision_cfg),
            "embed_dim": self.width,
            "quick_gelu": self.quick_gelu,
            "preprocess": compact_config(self.preprocess_cfg),
        }


def visual_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision encoder's weights of a full CLIP (``visual.*``) or a visual-only state dict."""
    if any(name.startswith("visual.") for name in state):
        return {
            name.removeprefix("visual."): value
            for name, value in state.items()
            if name.startswith("visual.")
        }
    return state
