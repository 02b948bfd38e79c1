"""The time-series tower: windows, missing channels, fitted per-channel statistics, both
encoders (1-D ResNet, patch transformer) through training, ``last_blocks``, gradient
checkpointing and ONNX (equal to torch, checked with onnxruntime)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mmalign.config import ConfigError, TrainConfig
from mmalign.convert import to_onnx
from mmalign.model import AlignmentModel
from mmalign.towers import build_tower
from mmalign.training.memory_savers import apply_memory_savers
from mmalign.training.optim import build_optimizer

RESNET = {"type": "timeseries", "channels": 2, "window": 32, "width": 16,
          "resnet_channels": [8, 16]}  # fmt: skip
PATCH = {"type": "timeseries", "channels": 2, "window": 32, "width": 16, "encoder": "patch",
         "patch": 8, "heads": 2}  # fmt: skip
HF = {**PATCH, "encoder": "hf"}
ENCODERS = pytest.mark.parametrize("config", [RESNET, PATCH, HF], ids=["resnet", "patch", "hf"])


def test_windows_are_centred_at_eval_random_when_augmenting_and_padded_as_missing() -> None:
    tower = build_tower({**RESNET, "window": 4})
    signal = np.stack([np.arange(10.0), -np.arange(10.0)])
    assert tower.preprocess(signal)[0].tolist() == [3.0, 4.0, 5.0, 6.0]
    torch.manual_seed(0)
    starts = {int(tower.preprocess(signal, augment=True)[0, 0]) for _ in range(40)}
    assert starts == set(range(7))
    padded = tower.preprocess(signal[:, :3])
    assert padded[0, :3].tolist() == [0.0, 1.0, 2.0] and padded[:, 3].isnan().all()


def test_csv_columns_pick_channels_and_an_absent_column_is_a_missing_channel() -> None:
    tower = build_tower({**RESNET, "channels": 3, "columns": ["ii", "v1", "v5"], "window": 3})
    item = tower.preprocess({"v5": np.array([1.0, 2.0, 3.0]), "ii": np.zeros(3), "t": [0, 1, 2]})
    assert item[0].tolist() == [0.0, 0.0, 0.0] and item[2].tolist() == [1.0, 2.0, 3.0]
    assert item[1].isnan().all()
    with pytest.raises(ValueError, match=r"NaN samples in channels \[0\]"):
        tower.preprocess({"ii": np.array([1.0, np.nan, 3.0])})
    with pytest.raises(ValueError, match="none of the columns"):
        tower.preprocess({"x": np.zeros(3)})
    with pytest.raises(ConfigError, match=r"channels 2 != len\(columns\) 3"):
        build_tower({**RESNET, "columns": ["a", "b", "c"]})


def test_a_signal_with_its_own_rate_is_resampled_to_the_towers() -> None:
    tower = build_tower({**RESNET, "channels": 1, "sample_rate": 100, "window": 100})
    item = tower.preprocess((np.sin(np.arange(400) * 2 * np.pi * 5 / 400), 400))
    spectrum = np.abs(np.fft.rfft(item[0].numpy()))
    assert spectrum.argmax() == 5  # 5 Hz stays 5 Hz


def test_fitted_statistics_equal_numpy_and_ignore_missing_values() -> None:
    rng = np.random.default_rng(0)
    signals = rng.normal([[3.0], [-2.0]], [[2.0], [0.5]], size=(6, 2, 32)).astype(np.float32)
    signals[1, 1] = np.nan  # a missing channel
    signals[2, :, 20:] = np.nan  # padding
    tower = build_tower({**RESNET, "normalize": "fit"})
    tower.fit_normalization(signals)
    per_channel = signals.transpose(1, 0, 2).reshape(2, -1)
    np.testing.assert_allclose(tower.mean.numpy(), np.nanmean(per_channel, 1), rtol=1e-5)
    np.testing.assert_allclose(tower.std.numpy(), np.nanstd(per_channel, 1), rtol=1e-5)


@ENCODERS
def test_a_missing_channel_is_masked_and_items_do_not_depend_on_their_batch(config: dict) -> None:
    torch.manual_seed(0)
    tower = build_tower(config).eval()
    rng = np.random.default_rng(1)
    full, partial = rng.normal(size=(2, 2, 32)).astype(np.float32)
    partial[1] = np.nan
    with torch.no_grad():
        alone = tower(tower.collate([tower.preprocess(partial)]))
        together = tower(tower.collate([tower.preprocess(full), tower.preprocess(partial)]))
        zeros = partial.copy()
        zeros[1] = 0.0  # observed zeros are not a missing channel
        observed = tower(tower.collate([tower.preprocess(zeros)]))
    torch.testing.assert_close(together[1:], alone, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(alone).all() and not torch.allclose(alone, observed, atol=1e-4)


def _waves(rows: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two-channel sines whose frequency and phase the paired 2-vector holds."""
    rng = np.random.default_rng(seed)
    params = rng.uniform(0.5, 3.0, size=(rows, 2)).astype(np.float32)
    time = np.linspace(0, 2 * np.pi, 48)
    waves = [
        np.stack([np.sin(f * time + p), np.cos(f * time + p)]).astype(np.float32) for f, p in params
    ]
    return waves, list(params)


@ENCODERS
def test_it_trains_against_a_paired_modality(config: dict) -> None:
    torch.manual_seed(0)
    model = AlignmentModel.from_config(
        {"dim": 8, "towers": {"ts": config, "p": {"type": "tabular", "in_features": 2}}}
    )
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3))
    waves, params = _waves(24)
    inputs = {
        "ts": model.tower("ts").collate([model.tower("ts").preprocess(w) for w in waves]),
        "p": model.tower("p").collate([model.tower("p").preprocess(p) for p in params]),
    }
    losses = []
    for _ in range(60):
        loss = model.loss(model(inputs)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[1]  # from chance (log 24 = 3.18) after the first step


def test_last_blocks_train_the_top_residual_blocks_and_the_head() -> None:
    tower = build_tower({**RESNET, "trainable": {"last_blocks": 1}})
    trained = {name.split(".")[1] + name.split(".")[2][:1] for name, p in tower.named_parameters()
               if p.requires_grad}  # fmt: skip
    assert trained == {"layers1", "headw", "headb"}
    patch = build_tower({**PATCH, "layers": 3, "trainable": {"last_blocks": 2}})
    trained_layers = {
        name.split(".")[3] for name, p in patch.named_parameters()
        if p.requires_grad and name.startswith("encoder.layers.")
    }  # fmt: skip
    assert trained_layers == {"1", "2"}


@ENCODERS
def test_gradient_checkpointing_gives_the_same_gradients(config: dict) -> None:
    torch.manual_seed(0)
    plain = AlignmentModel.from_config({"dim": 8, "towers": {"ts": config, "u": config}})
    checkpointed = copy.deepcopy(plain)
    applied = apply_memory_savers(checkpointed, TrainConfig(gradient_checkpointing=True))
    assert sorted(applied["gradient_checkpointing"]) == ["ts", "u"]
    blocks = checkpointed.tower("ts").blocks()  # each block's forward checkpointed
    assert blocks and all("forward" in vars(m) for block in blocks for m in block)
    waves, _ = _waves(6)
    grads = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        tower = model.tower("ts")
        inputs = tower.collate([tower.preprocess(w) for w in waves])
        model.loss(model({"ts": inputs, "u": inputs.flip(-1)})).loss.backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in grads["plain"].items():
        torch.testing.assert_close(grads["checkpointed"][name], grad, rtol=1e-5, atol=1e-6)


@ENCODERS
def test_onnx_equals_torch_with_missing_channels(config: dict, tmp_path: Path) -> None:
    import onnxruntime

    torch.manual_seed(0)
    model = AlignmentModel.from_config({"dim": 8, "towers": {"ts": config}}).eval()
    model.tower("ts").fit_normalization(np.random.default_rng(0).normal(2, 3, (4, 2, 32)))
    to_onnx(model, tmp_path / "onnx")
    assert json.loads((tmp_path / "onnx" / "onnx.json").read_text())["ts"]["inputs"] == {
        "signal": "float32"
    }
    waves, _ = _waves(3)
    waves[1][0] = np.nan
    tower = model.tower("ts")
    inputs = tower.collate([tower.preprocess(w) for w in waves])
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "ts.onnx"))
    (exported,) = session.run(None, {"signal": inputs.numpy()})
    with torch.no_grad():
        expected = model.embed("ts", inputs)
    np.testing.assert_allclose(exported, expected.numpy(), atol=1e-4)


def test_hf_last_blocks_train_the_top_patchtst_layers() -> None:
    tower = build_tower({**HF, "layers": 3, "trainable": {"last_blocks": 2}})
    assert [type(block[0]).__name__ for block in tower.blocks()] == ["PatchTSTEncoderLayer"] * 3
    trained = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trained == {
        n
        for n, _ in tower.named_parameters()
        if n.startswith(("encoder.model.encoder.layers.1.", "encoder.model.encoder.layers.2."))
    }


def save_patchtst(directory: Path, **changes: Any) -> Path:
    """A PatchTST with random weights, saved as a user would: overlapping patches, its own
    std scaling and (pretraining) input masking on."""
    import transformers

    torch.manual_seed(1)
    settings = {"num_input_channels": 2, "context_length": 32, "patch_length": 8,
                "patch_stride": 4, "d_model": 16, "num_attention_heads": 2,
                "num_hidden_layers": 1, "ffn_dim": 32, "do_mask_input": True,
                "norm_type": "layernorm", "scaling": "std"}  # fmt: skip
    config = transformers.PatchTSTConfig(**{**settings, **changes})
    transformers.PatchTSTModel(config).save_pretrained(directory)
    return directory


def test_hf_from_a_local_folder_equals_transformers_and_survives_save_and_load(
    tmp_path: Path,
) -> None:
    import transformers

    folder = save_patchtst(tmp_path / "patchtst")
    config = {"type": "timeseries", "encoder": "hf", "path": str(folder), "channels": 2,
              "window": 32}  # fmt: skip
    model = AlignmentModel.from_config({"dim": 8, "towers": {"ts": config}}).eval()
    tower = model.tower("ts")
    tower.fit_normalization(np.random.default_rng(0).normal(2, 3, (4, 2, 32)))
    reference = transformers.AutoModel.from_pretrained(folder, do_mask_input=False).eval()
    waves, _ = _waves(3)
    waves[1][1] = np.nan  # a missing channel
    inputs = tower.collate([tower.preprocess(w) for w in waves])
    observed = ~inputs.isnan()
    values = ((inputs - tower.mean[:, None]) / tower.std[:, None]).nan_to_num(0.0)
    with torch.no_grad():
        hidden = reference(
            past_values=values.transpose(1, 2), past_observed_mask=observed.transpose(1, 2).float()
        ).last_hidden_state
        expected = torch.stack(
            [hidden[0].mean((0, 1)), hidden[1, 0].mean(0), hidden[2].mean((0, 1))]
        )
        torch.testing.assert_close(tower(inputs), expected, rtol=0, atol=1e-6)
    saved = model.save_pretrained(tmp_path / "saved")
    torch.testing.assert_close(AlignmentModel.from_pretrained(saved).encode("ts", waves),
                               model.encode("ts", waves))  # fmt: skip


def test_the_onnx_patching_equals_transformers_unfold_with_overlapping_patches(
    tmp_path: Path,
) -> None:
    tower = build_tower({**HF, "path": str(save_patchtst(tmp_path / "p"))}).eval()
    patchify = tower.encoder.model.patchifier
    values = torch.randn(3, 32, 2)
    with tower.exportable():
        torch.testing.assert_close(tower.encoder.model.patchifier(values), patchify(values))
    assert tower.encoder.model.patchifier is patchify


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"channels": 3}, r"model.towers.ts.channels: 3, but the model at model.towers.ts.path "
                          r"takes 2 \(num_input_channels\); set channels: 2"),
        ({"window": 64}, r"model.towers.ts.window: 64, .* \(context_length\); set window: 32"),
        ({"path": None, "patch": 32}, "encoder hf: patch 32 must be shorter than window"),
        ({"path": None, "patch": 5}, "patch 5 must divide window 32"),
        ({"encoder": "patch"}, "'path' is only used with encoder: hf"),
        ({"path": "nowhere"}, r"model.towers.ts.path: nowhere is not a Hugging Face model"),
    ],
)  # fmt: skip
def test_hf_config_errors_are_one_line_naming_the_field(
    tmp_path: Path, changes: dict, message: str
) -> None:
    config = {**HF, "path": str(save_patchtst(tmp_path / "p")), **changes}
    with pytest.raises(ConfigError, match=message) as error:
        AlignmentModel.from_config({"dim": 8, "towers": {"ts": config}})
    assert "\n" not in str(error.value)
