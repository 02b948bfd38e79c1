"""``mmalign convert --to hf`` of the video (VideoMAE) and time-series (PatchTST) towers: the
folders load offline with ``AutoModel`` / ``AutoVideoProcessor``, and the pooling, input
tensors and projection the README describes reproduce the tower's features and mmalign's
embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

from mmalign.cli.main import main
from mmalign.model import AlignmentModel
from mmalign.towers.video import sample_indices
from tests.towers.test_timeseries import HF as TIMESERIES
from tests.towers.test_timeseries import _waves
from tests.towers.test_video import _clips, save_videomae


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[AlignmentModel, Path]:
    """A saved model with a VideoMAE from a local folder and a PatchTST from scratch (fitted
    normalization), and its ``--to hf`` folder."""
    root = tmp_path_factory.mktemp("hf_vt")
    folder = save_videomae(root / "videomae")
    video = {"type": "video", "encoder": "hf", "path": str(folder), "frames": 4, "image_size": 16}
    torch.manual_seed(0)
    model = AlignmentModel.from_config({"dim": 8, "towers": {"v": video, "ts": TIMESERIES}})
    model.tower("ts").fit_normalization(np.random.default_rng(0).normal(2, 3, (4, 2, 32)))
    saved = model.save_pretrained(root / "model")
    assert main(["convert", str(saved), "--to", "hf", "--out", str(root / "hf")]) == 0
    return AlignmentModel.from_pretrained(saved), root / "hf"


def test_the_video_folder_loads_with_automodel_and_gives_the_towers_features(
    exported: tuple[AlignmentModel, Path],
) -> None:
    model, out = exported
    videomae = transformers.AutoModel.from_pretrained(out / "v", local_files_only=True).eval()
    processor = transformers.AutoVideoProcessor.from_pretrained(out / "v", local_files_only=True)
    assert type(videomae).__name__ == "VideoMAEModel"
    clips, _ = _clips(3)
    frames = [c[sample_indices(len(c), 1.0, 4, None, augment=False)] for c in clips]
    pixel_values = processor(videos=frames, return_tensors="pt")["pixel_values"]
    tower = model.tower("v")
    inputs = tower.collate([tower.preprocess(c) for c in clips])
    torch.testing.assert_close(pixel_values, inputs, rtol=0, atol=0)
    with torch.no_grad():
        pooled = videomae(pixel_values=pixel_values).last_hidden_state.mean(1)
        assert (pooled - tower(inputs)).abs().max() <= 1e-5
    weight = load_file(out / "v" / "projection.safetensors")["weight"]
    embedding = F.normalize(pooled @ weight.T, dim=-1)
    assert (embedding - model.encode("v", clips)).abs().max() <= 1e-5


def test_the_timeseries_folder_loads_with_automodel_and_gives_the_towers_features(
    exported: tuple[AlignmentModel, Path],
) -> None:
    model, out = exported
    patchtst = transformers.AutoModel.from_pretrained(out / "ts", local_files_only=True).eval()
    assert type(patchtst).__name__ == "PatchTSTModel"
    assert not (out / "ts" / "preprocessor_config.json").exists()
    tower = model.tower("ts")
    inputs = load_file(out / "ts" / "inputs.safetensors")
    assert torch.equal(inputs["mean"], tower.mean) and torch.equal(inputs["std"], tower.std)
    waves, _ = _waves(3)
    waves[2][0] = np.nan  # a missing channel
    signal = tower.collate([tower.preprocess(w) for w in waves])
    observed = ~signal.isnan()  # as the README says
    values = ((signal - inputs["mean"][:, None]) / inputs["std"][:, None]).nan_to_num(0.0)
    with torch.no_grad():
        hidden = patchtst(
            past_values=values.transpose(1, 2), past_observed_mask=observed.transpose(1, 2).float()
        ).last_hidden_state
        weights = observed.any(-1, keepdim=True).float()
        pooled = (hidden.mean(2) * weights).sum(1) / weights.sum(1)
        assert (pooled - tower(signal)).abs().max() <= 1e-5
    weight = load_file(out / "ts" / "projection.safetensors")["weight"]
    embedding = F.normalize(pooled @ weight.T, dim=-1)
    assert (embedding - model.encode("ts", waves)).abs().max() <= 1e-5
    readme = (out / "README.md").read_text()
    assert "| `ts/` | `PatchTSTModel` | none: `past_values = ((signal - mean" in readme
    assert (
        "| `v/` | `VideoMAEModel` | `VideoMAEVideoProcessor` | the mean over all tokens" in readme
    )
