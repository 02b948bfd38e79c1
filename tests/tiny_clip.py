"""Tiny random open_clip models written as the folders and caches users bring (test helper).

No test here: test_pretrained_*.py and test_convert_*.py import these builders.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file

TINY_CLIP: dict[str, Any] = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
"""A two-layer ViT + one-layer text transformer CLIP (quick_gelu, as OpenAI's models)."""
PREPROCESS = {
    "mean": [0.5, 0.4, 0.3],
    "std": [0.2, 0.25, 0.3],
    "interpolation": "bilinear",
    "resize_mode": "squash",
}
"""Non-default preprocessing, so a tower that ignored the folder's would differ."""
LOGIT_SCALE = math.log(42.0)
CLASSNAMES = ["zero", "one", "two", "three"]
TEMPLATES = ["a photo of a {}", "a drawing of the number {}"]


def random_clip(seed: int = 0, custom_text: bool = False) -> torch.nn.Module:
    """A random tiny CLIP whose ``logit_scale`` is log(42) (not open_clip's init)."""
    torch.manual_seed(seed)
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    model = cls(**TINY_CLIP).eval()
    with torch.no_grad():
        model.logit_scale.fill_(LOGIT_SCALE)
    return model


def write_open_clip_folder(directory: Path, model: torch.nn.Module) -> Path:
    """``open_clip_config.json`` + ``open_clip_model.safetensors``, the hf-hub layout."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": TINY_CLIP, "preprocess_cfg": PREPROCESS}
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    state = {name: value.contiguous() for name, value in model.state_dict().items()}
    save_file(state, str(directory / "open_clip_model.safetensors"))
    return directory


def write_hf_cache(cache: Path, repo_id: str, model: torch.nn.Module) -> Path:
    """A Hugging Face hub cache holding ``repo_id`` as huggingface_hub lays it out:
    ``models--ORG--NAME/snapshots/<revision>/`` with ``refs/main`` naming the revision."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    write_open_clip_folder(repo / "snapshots" / revision, model)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return cache


def random_images(count: int, seed: int = 0) -> list[Image.Image]:
    """RGB images of assorted sizes (so resizing and cropping matter)."""
    rng = np.random.default_rng(seed)
    sizes = [(40, 50), (32, 32), (64, 48), (37, 41)]
    return [
        Image.fromarray(rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8))
        for i in range(count)
    ]


@torch.no_grad()
def open_clip_reference(
    name: str, images: list[Image.Image], pretrained: str | None = None
) -> dict[str, torch.Tensor]:
    """open_clip's own recipe: normalized image features, the zero-shot classifier of
    ``build_zero_shot_classifier`` and ``softmax(logit_scale.exp() * features @ classifier)``."""
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    batch = torch.stack([preprocess(image) for image in images])
    features = torch.nn.functional.normalize(model.encode_image(batch), dim=-1)
    classifier = open_clip.build_zero_shot_classifier(
        model, tokenizer, CLASSNAMES, TEMPLATES, device="cpu"
    )
    texts = torch.nn.functional.normalize(model.encode_text(tokenizer(CLASSNAMES)), dim=-1)
    return {
        "image": features,
        "text": texts,
        "classifier": classifier.T,
        "proba": torch.softmax(model.logit_scale.exp() * features @ classifier, dim=-1),
        "logit_scale": model.logit_scale.detach().clone(),
    }


def class_image(label: int, rng: np.random.Generator, size: int = 36) -> Image.Image:
    """A noisy image whose bright quadrant is ``label`` (0-3)."""
    array = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
    half = size // 2
    row, column = divmod(label % 4, 2)
    array[row * half : (row + 1) * half, column * half : (column + 1) * half] += 150
    return Image.fromarray(array)


def write_image_text_shards(path: Path, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """One WebDataset tar of ``count`` records (``png`` image, ``txt`` caption, ``cls``);
    returns the records (with the PIL image under ``image``)."""
    import io

    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    with wds.TarWriter(str(path)) as writer:
        for index in range(count):
            label = index % len(CLASSNAMES)
            image = class_image(label, rng)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            caption = f"a photo of a {CLASSNAMES[label]}"
            key = f"sample{index:05d}"
            writer.write({"__key__": key, "png": buffer.getvalue(), "txt": caption, "cls": label})
            records.append({"key": key, "image": image, "text": caption, "label": label})
    return records
