"""mmalign -> open_clip: an image and a text tower as an open_clip ``CustomTextCLIP`` folder.

The folder holds ``open_clip_config.json`` (``model_cfg`` with the resolved vision and text
configs, ``preprocess_cfg`` with the image tower's preprocessing) and
``open_clip_model.safetensors`` (``visual.*``, ``text.*``, ``logit_scale`` and, for sigmoid
models, ``logit_bias``). mmalign's linear projections are folded into open_clip's last linear
map of each tower (the ViT's ``proj``, ModifiedResNet's ``attnpool.c_proj``, a timm model's
``head.proj``, the text transformer's ``text_projection``), so open_clip's
``encode_image``/``encode_text`` give mmalign's embeddings. The result is loaded back strictly
before it is written.

Refused, naming why: towers that are not open_clip towers (a Hugging Face text encoder, a
SentencePiece tokenizer open_clip cannot rebuild from the config), an MLP projection, image
and text towers that disagree on ``quick_gelu``, a vision head with no single last linear map.

Example:
    >>> to_open_clip(model, "exported/clip")  # doctest: +SKIP
    >>> import open_clip
    >>> clip, _, preprocess = open_clip.create_model_and_transforms(
    ...     "local-dir:exported/clip")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from safetensors.torch import save_file
from torch import nn

from mmalign.convert.common import output_directory, pick_tower, projection_matrix
from mmalign.errors import UserError
from mmalign.files import naming_errors, write_json
from mmalign.model import AlignmentModel
from mmalign.towers.image import ImageTower
from mmalign.towers.pretrained import OPEN_CLIP_CONFIG, compact_config
from mmalign.towers.text import OpenCLIPText, TextTower

WEIGHTS = "open_clip_model.safetensors"


def to_open_clip(
    model: AlignmentModel,
    directory: str | Path,
    image: str | None = None,
    text: str | None = None,
) -> Path:
    """Write ``model``'s image and text towers (the only ones of their type, or ``image`` /
    ``text``) as an open_clip folder ``directory``; returns it (see the module docstring).

    Example:
        >>> to_open_clip(model, "exported/clip", image="photo")  # doctest: +SKIP
        PosixPath('exported/clip')
    """
    image = pick_tower(model, "image", image, "--image", "open_clip")
    text = pick_tower(model, "text", text, "--text", "open_clip")
    image_tower, text_tower = model.towers[image], model.towers[text]
    if not isinstance(image_tower, ImageTower) or not isinstance(text_tower, TextTower):
        raise UserError(
            f"towers {image!r} and {text!r} are not mmalign's image and text towers "
            "(model.towers); only those map onto open_clip's CLIP"
        )
    encoder = _open_clip_text(text_tower, text)
    if image_tower.quick_gelu != encoder.quick_gelu:
        raise UserError(
            f"the image and text towers disagree on quick_gelu (model.towers.{text}.quick_gelu); "
            "open_clip's config has one quick_gelu for both towers"
        )
    field = "model.projection"
    image_projection = projection_matrix(model.projections[image], field)
    text_projection = projection_matrix(model.projections[text], field)
    state, vision_cfg = _visual(image_tower, image_projection, image)
    text_state, text_cfg = _text(encoder, text_projection)
    state.update(text_state)
    state["logit_scale"] = model.logit_scale.detach().reshape(())
    model_cfg: dict[str, Any] = {
        "embed_dim": model.dim,
        "quick_gelu": image_tower.quick_gelu,
        "custom_text": True,
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
    }
    if model.logit_bias is not None:
        state["logit_bias"] = model.logit_bias.detach().reshape(())
        model_cfg["init_logit_bias"] = model.logit_bias.item()
    state = {name: value.detach().float().contiguous().cpu() for name, value in state.items()}
    _check_strict_load(model_cfg, state)
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": dataclasses.asdict(image_tower.preprocess_cfg),
    }
    with output_directory(directory, "open_clip") as staging:
        write_json(staging / OPEN_CLIP_CONFIG, config)
        with naming_errors(staging / WEIGHTS):
            save_file(state, str(staging / WEIGHTS))
    return Path(directory)


def _open_clip_text(tower: TextTower, name: str) -> OpenCLIPText:
    encoder = tower.encoder
    if not isinstance(encoder, OpenCLIPText):
        raise UserError(
            f"text tower {name!r} is a Hugging Face encoder, not open_clip's text transformer "
            f"(model.towers.{name}.backend: hf); hand it over with --to hf instead"
        )
    if encoder.sentencepiece is not None:
        raise UserError(
            f"text tower {name!r} uses a SentencePiece tokenizer that open_clip cannot rebuild "
            f"from open_clip_config.json (model.towers.{name}.tokenizer); use --to onnx, or "
            "train with open_clip's BPE tokenizer"
        )
    return encoder


def _visual(
    tower: ImageTower, projection: torch.Tensor | None, name: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``visual.*`` weights with the projection folded into the last linear map."""
    state = dict(tower.visual.state_dict())
    vision_cfg = compact_config(tower.vision_cfg)
    if projection is not None:
        key = _last_linear_key(tower.visual, name)
        if key.endswith(".weight"):  # nn.Linear: y = W x + b  ->  P W x + P b
            state[key] = projection @ state[key]
            bias = key.removesuffix(".weight") + ".bias"
            if bias in state:
                state[bias] = projection @ state[bias]
        else:  # a [in, out] matrix applied as x @ proj
            state[key] = state[key] @ projection.T
    return {f"visual.{key}": value for key, value in state.items()}, vision_cfg


def _last_linear_key(visual: nn.Module, name: str) -> str:
    vit = isinstance(visual, VisionTransformer) and isinstance(visual.proj, nn.Parameter)
    if vit and visual.attn_pool is None:
        return "proj"
    if isinstance(visual, ModifiedResNet):
        return "attnpool.c_proj.weight"
    if isinstance(visual, TimmModel) and hasattr(visual.head, "proj"):
        return "head.proj.weight"
    raise UserError(
        f"the {type(visual).__name__} vision tower of {name!r} has no single last linear map "
        f"to fold the projection into (model.towers.{name}.vision_cfg); train with "
        "projection: none, or export with --to onnx"
    )


def _text(
    encoder: OpenCLIPText, projection: torch.Tensor | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``text.*`` weights with the projection folded into ``text_projection``."""
    state = dict(encoder.module.state_dict())
    text_cfg = compact_config(encoder.text_cfg)
    current = encoder.module.text_projection
    if projection is not None:
        if isinstance(current, nn.Linear):
            state["text_projection.weight"] = projection @ state["text_projection.weight"]
            if current.bias is not None:
                state["text_projection.bias"] = projection @ state["text_projection.bias"]
        elif current is None:
            state["text_projection"] = projection.T
            text_cfg.update(proj_type="linear", proj_bias=False)
        else:
            state["text_projection"] = state["text_projection"] @ projection.T
    elif current is None:
        text_cfg["proj_type"] = "none"
    return {f"text.{key}": value for key, value in state.items()}, text_cfg


def _check_strict_load(model_cfg: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Build open_clip's model from ``model_cfg`` and load ``state`` strictly, as
    ``create_model`` will."""
    arguments = {key: value for key, value in model_cfg.items() if key != "custom_text"}
    clip = open_clip.CustomTextCLIP(**arguments)
    try:
        clip.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise UserError(
            f"the converted weights do not load into open_clip's model ({error}) "
            "(model.towers); export with --to onnx instead"
        ) from None
