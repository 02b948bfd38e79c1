"""open_clip checkpoints into mmalign towers: a model name + checkpoint file, a ``local-dir:``
folder and ``hf-hub:`` from a local cache give open_clip's own embeddings, zero-shot
classifier and probabilities (the temperature carried over), and saved models reload in a
fresh process without the folder or a registered config name."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import open_clip
import pytest
import torch

from mmalign.config import ConfigError
from mmalign.eval.zeroshot import ZeroShotClassifier
from mmalign.model import AlignmentModel
from tests.tiny_clip import (
    CLASSNAMES,
    LOGIT_SCALE,
    TEMPLATES,
    TINY_CLIP,
    open_clip_reference,
    random_clip,
    random_images,
    write_hf_cache,
    write_open_clip_folder,
)

REPO = Path(__file__).resolve().parents[2]
NO_CHECKPOINT = {"embed_dim": 16, "vision_cfg": TINY_CLIP["vision_cfg"]}


def clip_model(image: dict, text: dict, **model) -> AlignmentModel:
    towers = {"image": {"type": "image", **image}, "text": {"type": "text", **text}}
    return AlignmentModel.from_config({"dim": 16, "projection": "none", "towers": towers, **model})


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline Hugging Face cache in tmp_path (HF_HUB_CACHE, HF_HUB_OFFLINE=1)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def sources(kind: str, tmp_path: Path, hf_cache: Path) -> tuple[dict, str, str | None]:
    """(tower keys, open_clip name, open_clip pretrained) of one way to bring the model."""
    model = random_clip()
    if kind == "local-dir":
        folder = write_open_clip_folder(tmp_path / "clip", model)
        return {"pretrained": f"local-dir:{folder}"}, f"local-dir:{folder}", None
    if kind == "hf-hub":
        write_hf_cache(hf_cache, "tiny-org/tiny-clip", model)
        return {"pretrained": "hf-hub:tiny-org/tiny-clip"}, "hf-hub:tiny-org/tiny-clip", None
    config_file = tmp_path / "mmalign-tiny-test.json"  # a registered custom open_clip config
    config_file.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config_file)
    checkpoint = write_open_clip_folder(tmp_path / "ckpt", model) / "open_clip_model.safetensors"
    keys = {"model": "mmalign-tiny-test", "checkpoint": str(checkpoint)}
    return keys, "mmalign-tiny-test", str(checkpoint)


@pytest.mark.parametrize("kind", ["name+checkpoint", "local-dir", "hf-hub"])
def test_towers_equal_open_clip_and_carry_the_temperature(
    kind: str, tmp_path: Path, hf_cache: Path
) -> None:
    keys, name, pretrained = sources(kind, tmp_path, hf_cache)
    images = random_images(6)
    reference = open_clip_reference(name, images, pretrained)
    model = clip_model(keys, keys).eval()

    assert model.logit_scale.item() == pytest.approx(LOGIT_SCALE, abs=1e-6)
    assert model.config.logit_scale_init == pytest.approx(LOGIT_SCALE, abs=1e-6)
    image = model.encode("image", images)
    assert (image - reference["image"]).abs().max() <= 1e-6
    text = model.encode("text", CLASSNAMES)
    assert (text - reference["text"]).abs().max() <= 1e-6
    classifier = ZeroShotClassifier.from_texts(model, CLASSNAMES, TEMPLATES)
    assert (classifier.class_embeddings - reference["classifier"]).abs().max() <= 1e-6
    proba = classifier.predict_proba({"image": images})
    assert (proba - reference["proba"]).abs().max() <= 1e-5
    # the temperature matters here: open_clip's default scale gives other probabilities
    assert (
        torch.softmax(math.log(1 / 0.07) * image @ reference["classifier"].T, -1) - proba
    ).abs().max() > 1e-2


@pytest.mark.launches
def test_saved_model_reloads_in_a_fresh_process_without_folder_or_registration(
    tmp_path: Path, hf_cache: Path
) -> None:
    keys, _, _ = sources("name+checkpoint", tmp_path, hf_cache)
    folder = write_open_clip_folder(tmp_path / "folder", random_clip(seed=1))
    model = clip_model(keys, {"pretrained": f"local-dir:{folder}"}).eval()
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))  # two checkpoints
    images = random_images(3)
    saved = model.save_pretrained(tmp_path / "saved")
    shutil.rmtree(tmp_path / "ckpt")
    shutil.rmtree(folder)
    np.save(tmp_path / "images.npy", np.stack([np.asarray(i.resize((40, 40))) for i in images]))
    expected = torch.cat(
        [
            model.encode("image", list(np.load(tmp_path / "images.npy"))),
            model.encode("text", CLASSNAMES),
        ]
    )
    script = (
        "import sys, numpy as np, torch\n"
        "from mmalign.model import AlignmentModel\n"
        "model = AlignmentModel.from_pretrained(sys.argv[1])\n"
        "images = list(np.load(sys.argv[2]))\n"
        f"out = torch.cat([model.encode('image', images), model.encode('text', {CLASSNAMES!r})])\n"
        "np.save(sys.argv[3], out.numpy())\n"
    )
    subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(saved),
            str(tmp_path / "images.npy"),
            str(tmp_path / "out.npy"),
        ],
        check=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert (torch.from_numpy(np.load(tmp_path / "out.npy")) - expected).abs().max() <= 1e-6
    towers = json.loads((saved / "config.json").read_text())["towers"]
    assert towers["image"]["model"] is None and towers["text"]["pretrained"] is True


def test_logit_scale_init_number_from_checkpoint_and_default(tmp_path: Path) -> None:
    folder = write_open_clip_folder(tmp_path / "clip", random_clip())
    other = random_clip(seed=2)
    with torch.no_grad():
        other.logit_scale.fill_(1.5)
    second = write_open_clip_folder(tmp_path / "other", other)
    pretrained = {"pretrained": f"local-dir:{folder}"}
    tiny_text = {"width": 16, "heads": 2, "layers": 1, "context_length": 16}

    assert clip_model(pretrained, pretrained, logit_scale_init=1.0).logit_scale.item() == 1.0
    one_tower = clip_model(pretrained, tiny_text)
    assert one_tower.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    explicit = clip_model(pretrained, tiny_text, logit_scale_init="from_checkpoint")
    assert explicit.logit_scale.item() == pytest.approx(LOGIT_SCALE)
    with pytest.raises(
        ConfigError, match=r"model.logit_scale_init: the towers' checkpoints disagree"
    ):
        clip_model(
            pretrained, {"pretrained": f"local-dir:{second}"}, logit_scale_init="from_checkpoint"
        )
    with pytest.raises(ConfigError, match=r"model.logit_scale_init: from_checkpoint, but no tower"):
        clip_model(NO_CHECKPOINT, tiny_text, logit_scale_init="from_checkpoint")


def test_missing_sources_name_the_field_and_the_cache(tmp_path: Path, hf_cache: Path) -> None:
    with pytest.raises(ConfigError) as error:
        clip_model({"pretrained": "hf-hub:tiny-org/absent"}, {})
    message = str(error.value)
    assert message.startswith("model.towers.image.pretrained: hf-hub:tiny-org/absent is not in")
    assert str(hf_cache) in message and "never downloads" in message
    with pytest.raises(ConfigError, match=r"model.towers.text.pretrained: .*open_clip_config.json"):
        clip_model(NO_CHECKPOINT, {"pretrained": f"local-dir:{tmp_path}"})
    with pytest.raises(ConfigError, match=r"model.towers.image: `model:` and `pretrained:` both"):
        clip_model({"model": "ViT-B-32", "pretrained": f"local-dir:{tmp_path}"}, {})
    with pytest.raises(ConfigError, match=r"model.towers.image.pretrained: 'ViT-B-32' is neither"):
        clip_model({"pretrained": "ViT-B-32"}, {})
