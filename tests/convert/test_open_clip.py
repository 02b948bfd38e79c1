"""mmalign -> open_clip: ``mmalign convert --to open_clip`` writes a folder that open_clip
loads strictly, in a fresh process, and whose embeddings equal mmalign's (projections folded
in, temperature included); towers open_clip cannot hold are refused with the field named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from mmalign.cli.main import main
from mmalign.convert import to_open_clip
from mmalign.model import AlignmentModel
from mmalign.training import train
from tests.tiny_clip import CLASSNAMES, random_images, write_image_text_shards
from tests.towers.test_image_text import make_hf_text

REPO = Path(__file__).resolve().parents[2]
VIT = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16}
RESNET = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16}
TEXT = {"type": "text", "width": 32, "heads": 2, "layers": 1, "context_length": 16}


def image_text_config(output: Path, shards: str) -> dict:
    towers = {
        "image": {"type": "image", "embed_dim": 24, "vision_cfg": VIT},
        "text": {**TEXT, "embed_dim": 20},
    }
    return {
        "model": {"dim": 12, "projection": "linear", "towers": towers},
        "data": {
            "train": shards,
            "fields": {"image": "png", "text": "txt"},
            "batch_size": 8,
            "shuffle_buffer": 0,
            "resampled": False,
        },
        "train": {
            "steps": 3,
            "lr": 0.01,
            "output": str(output),
            "log_every": 1,
            "tensorboard": False,
            "plots": False,
        },
    }


@pytest.mark.launches
def test_trained_model_converts_and_loads_strictly_in_a_fresh_process(tmp_path: Path) -> None:
    records = write_image_text_shards(tmp_path / "data" / "train-000000.tar", 24)
    result = train(image_text_config(tmp_path / "run", str(tmp_path / "data" / "train-000000.tar")))
    assert result.steps == 3
    out = tmp_path / "clip"
    assert main(["convert", str(tmp_path / "run"), "--to", "open_clip", "--out", str(out)]) == 0
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["model_cfg"]["embed_dim"] == 12

    model = AlignmentModel.from_pretrained(tmp_path / "run" / "model")
    images = [record["image"] for record in records[:5]]
    captions = [record["text"] for record in records[:5]]
    expected = torch.cat([model.encode("image", images), model.encode("text", captions)])
    for index, image in enumerate(images):
        image.save(tmp_path / f"{index}.png")
    script = (
        "import sys, json, numpy as np, torch, open_clip\n"
        "from PIL import Image\n"
        "clip, _, preprocess = open_clip.create_model_and_transforms('local-dir:' + sys.argv[1])\n"
        "tokenizer = open_clip.get_tokenizer('local-dir:' + sys.argv[1])\n"
        "clip.eval()\n"
        "files = [f'{sys.argv[2]}/{i}.png' for i in range(5)]\n"
        "images = torch.stack([preprocess(Image.open(file)) for file in files])\n"
        "captions = json.loads(sys.argv[3])\n"
        "with torch.no_grad():\n"
        "    image = torch.nn.functional.normalize(clip.encode_image(images), dim=-1)\n"
        "    text = torch.nn.functional.normalize(clip.encode_text(tokenizer(captions)), dim=-1)\n"
        "np.save(f'{sys.argv[2]}/out.npy', torch.cat([image, text]).numpy())\n"
        "print(float(clip.logit_scale))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(out), str(tmp_path), json.dumps(captions)],
        check=True,
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    converted = torch.from_numpy(np.load(tmp_path / "out.npy"))
    assert (converted - expected).abs().max() <= 1e-5
    assert float(done.stdout.strip().splitlines()[-1]) == pytest.approx(model.logit_scale.item())
    assert model.logit_scale.item() != pytest.approx(np.log(1 / 0.07), abs=1e-4)  # it trained


@pytest.mark.parametrize(
    ("image", "text", "objective"),
    [
        ({"vision_cfg": RESNET, "embed_dim": 24}, TEXT, "clip"),  # c_proj with bias; no text proj
        (
            {"vision_cfg": VIT, "embed_dim": 24, "quick_gelu": True},
            {**TEXT, "quick_gelu": True},
            "sigmoid",
        ),
    ],
)
def test_variants_fold_exactly(image: dict, text: dict, objective: str, tmp_path: Path) -> None:
    towers = {"image": {"type": "image", **image}, "text": text}
    model = AlignmentModel.from_config(
        {"dim": 12, "towers": towers, "objective": {"name": objective}}
    ).eval()
    to_open_clip(model, tmp_path / "clip")
    clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'clip'}")
    clip.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'clip'}")
    images = random_images(4)
    with torch.no_grad():
        image_features = clip.encode_image(torch.stack([preprocess(i) for i in images]))
        text_features = clip.encode_text(tokenizer(CLASSNAMES))
    diff_image = torch.nn.functional.normalize(image_features, dim=-1) - model.encode(
        "image", images
    )
    diff_text = torch.nn.functional.normalize(text_features, dim=-1) - model.encode(
        "text", CLASSNAMES
    )
    assert diff_image.abs().max() <= 1e-5 and diff_text.abs().max() <= 1e-5
    if objective == "sigmoid":
        assert clip.logit_bias.item() == pytest.approx(model.logit_bias.item())


def one_line_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mmalign: error: ")
    return err


def test_refusals_name_the_field_and_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    image = {"type": "image", "embed_dim": 24, "vision_cfg": VIT}
    mlp = AlignmentModel.from_config(
        {"dim": 12, "projection": "mlp", "towers": {"image": image, "text": TEXT}}
    ).save_pretrained(tmp_path / "mlp")
    err = one_line_error(
        capsys, ["convert", str(mlp), "--to", "open_clip", "--out", str(tmp_path / "o")]
    )
    assert "(model.projection: mlp); export it with --to onnx" in err
    hf = {"type": "text", "backend": "hf", "path": str(make_hf_text(tmp_path / "bert"))}
    bert = AlignmentModel.from_config({"dim": 12, "towers": {"image": image, "text": hf}})
    err = one_line_error(
        capsys,
        [
            "convert",
            str(bert.save_pretrained(tmp_path / "bert_model")),
            "--to",
            "open_clip",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert "(model.towers.text.backend: hf); hand it over with --to hf" in err
    tabular = AlignmentModel.from_config(
        {"dim": 4, "towers": {"x": {"type": "tabular", "in_features": 3}}}
    )
    err = one_line_error(
        capsys,
        [
            "convert",
            str(tabular.save_pretrained(tmp_path / "tab")),
            "--to",
            "open_clip",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert "the model has no image tower (--image)" in err
    err = one_line_error(
        capsys,
        ["convert", str(mlp), "--to", "hf", "--out", str(tmp_path / "o"), "--image", "image"],
    )
    assert "an option of --to open_clip only (--image); drop it for --to hf" in err
    assert not (tmp_path / "o").exists()
