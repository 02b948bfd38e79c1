"""The video tower: frame sampling, PyAV decoding equal to a bare PyAV loop, per-frame
preprocessing equal to the image tower's, both encoders (an image tower per frame with mean
or transformer pooling; a 3-D conv) through training, ``last_blocks``, gradient
checkpointing, save/load and ONNX (equal to torch, checked with onnxruntime)."""

from __future__ import annotations

import copy
import io
import pickle
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from mmalign.config import ConfigError, TrainConfig
from mmalign.convert import to_onnx
from mmalign.data.video import decode_video, encode_video
from mmalign.model import AlignmentModel
from mmalign.towers import build_tower
from mmalign.towers.video import sample_indices
from mmalign.training.memory_savers import apply_memory_savers
from mmalign.training.optim import build_optimizer

VIT = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 16,
       "layers": 2, "head_width": 8}}  # fmt: skip
FRAMES = {"type": "video", "frames": 4, "temporal": "transformer", "heads": 2, "image": VIT}
CONV3D = {"type": "video", "encoder": "conv3d", "frames": 4, "image_size": 16,
          "conv_channels": [8, 16], "width": 16}  # fmt: skip
HF = {"type": "video", "encoder": "hf", "frames": 4, "image_size": 16, "patch_size": 8,
      "width": 16, "heads": 2}  # fmt: skip
ENCODERS = pytest.mark.parametrize("config", [FRAMES, CONV3D, HF], ids=["frames", "conv3d", "hf"])


def moving_square(position: int, frames: int = 12, size: int = 32) -> np.ndarray:
    """A white square that moves right from column ``position`` over ``frames`` frames."""
    clip = np.zeros((frames, size, size, 3), np.uint8)
    for t in range(frames):
        left = (position + t) % (size - 8)
        clip[t, 12:20, left : left + 8] = 255
    return clip


def test_uniform_segments_random_within_them_and_fps_windows() -> None:
    assert sample_indices(12, 30.0, 4, None, augment=False) == [1, 4, 7, 10]
    torch.manual_seed(0)
    drawn = [sample_indices(12, 30.0, 4, None, augment=True) for _ in range(50)]
    assert all(a // 3 == k for row in drawn for k, a in enumerate(row))  # one per segment
    assert len({tuple(row) for row in drawn}) > 10
    assert sample_indices(300, 30.0, 3, 10.0, augment=False) == [146, 149, 152]
    windows = {sample_indices(300, 30.0, 3, 10.0, augment=True)[0] for _ in range(50)}
    assert min(windows) >= 0 and max(windows) <= 294 and len(windows) > 20
    assert sample_indices(4, 30.0, 3, 1.0, augment=False) == [0, 2, 3]  # too short: whole clip


def test_decoded_frames_equal_a_bare_pyav_decode() -> None:
    """Equal to ``frame.to_ndarray(format="rgb24")`` (the loader converts with one
    ``VideoReformatter`` per clip)."""
    clip = moving_square(3)
    data = encode_video(clip, 12.0)
    video = decode_video(data)
    assert (video.frame_count, video.fps, video.width, video.height) == (12, 12.0, 32, 32)
    with av.open(io.BytesIO(data)) as container:
        reference = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    np.testing.assert_array_equal(video.decode_frames([7, 2, 2]), np.stack(reference)[[7, 2, 2]])
    # the container opened for the header served the first decode; later ones reopen the bytes
    np.testing.assert_array_equal(video.decode_frames([11]), reference[11][None])
    copy_of = pickle.loads(pickle.dumps(decode_video(data)))  # pickled without the container
    np.testing.assert_array_equal(copy_of.decode_frames([0]), reference[0][None])
    assert np.abs(reference[5].astype(int) - clip[5]).mean() < 8  # lossy, but the same picture


def test_frames_are_preprocessed_as_the_image_tower_does() -> None:
    tower = build_tower(FRAMES)
    image = build_tower({"type": "image", **VIT})
    clip = moving_square(0, frames=8, size=40)
    expected = torch.stack([image.preprocess(frame) for frame in clip[[1, 3, 5, 7]]])
    torch.testing.assert_close(tower.preprocess((clip, 8.0)), expected)
    encoded = decode_video(encode_video(clip, 8.0))
    assert tower.preprocess(encoded).shape == (4, 3, 16, 16)
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\] uint8"):
        tower.preprocess(clip.astype(np.float32))
    with pytest.raises(ConfigError, match="needs 'image:'"):
        build_tower({"type": "video"})


def test_conv3d_frames_are_resized_and_cropped_as_open_clip_does() -> None:
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    tower = build_tower({**CONV3D, "frames": 3})
    clip = np.random.default_rng(0).integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    item = tower.preprocess((clip, 8.0))
    assert item.dtype == torch.uint8 and item.shape == (3, 3, 16, 16)
    reference = image_transform_v2(PreprocessCfg(size=16), is_train=False)
    expected = torch.stack([reference(Image.fromarray(frame)) for frame in clip])
    normalized = (item / 255.0 - tower.pixel_mean) / tower.pixel_std
    assert (normalized - expected).abs().mean() < 0.02  # torch's bicubic vs PIL's, uint8 both
    same_size = moving_square(0, frames=3, size=16)
    assert torch.equal(
        tower.preprocess((same_size, 8.0)), torch.from_numpy(same_size).permute(0, 3, 1, 2)
    )


def _clips(rows: int) -> tuple[list[np.ndarray], list[list[float]]]:
    positions = np.arange(rows) * 24 // rows
    return [moving_square(int(p)) for p in positions], [[p / 24, 1 - p / 24] for p in positions]


@ENCODERS
def test_it_trains_against_a_paired_modality(config: dict) -> None:
    torch.manual_seed(0)
    model = AlignmentModel.from_config(
        {"dim": 8, "towers": {"v": config, "p": {"type": "tabular", "in_features": 2}}}
    )
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3))
    clips, params = _clips(12)
    inputs = {
        "v": model.tower("v").collate([model.tower("v").preprocess(c) for c in clips]),
        "p": model.tower("p").collate([model.tower("p").preprocess(p) for p in params]),
    }
    losses = []
    for _ in range(40):
        loss = model.loss(model(inputs)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[1]  # from chance (log 12 = 2.48) after the first step


def test_last_blocks_count_the_image_blocks_then_the_temporal_ones() -> None:
    tower = build_tower({**FRAMES, "trainable": {"last_blocks": 2}})
    assert len(tower.blocks()) == 3
    trained = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert any(n.startswith("frame_tower.visual.transformer.resblocks.1.") for n in trained)
    assert not any(n.startswith("frame_tower.visual.transformer.resblocks.0.") for n in trained)
    assert any(n.startswith("temporal.layers.layers.0.") for n in trained)
    conv = build_tower({**CONV3D, "trainable": {"last_blocks": 1}})
    trained = {n for n, p in conv.named_parameters() if p.requires_grad}
    assert trained == {
        n
        for n, _ in conv.named_parameters()
        if n.startswith(("encoder.layers.1.", "encoder.head."))
    }


@ENCODERS
def test_gradient_checkpointing_gives_the_same_gradients(config: dict) -> None:
    torch.manual_seed(0)
    plain = AlignmentModel.from_config({"dim": 8, "towers": {"v": config, "u": config}})
    checkpointed = copy.deepcopy(plain)
    applied = apply_memory_savers(checkpointed, TrainConfig(gradient_checkpointing=True))
    assert sorted(applied["gradient_checkpointing"]) == ["u", "v"]
    if config is not FRAMES:  # through the tower's blocks(): each block's forward checkpointed
        blocks = checkpointed.tower("v").blocks()
        assert blocks and all("forward" in vars(m) for block in blocks for m in block)
    clips, _ = _clips(4)
    grads = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        tower = model.tower("v")
        inputs = tower.collate([tower.preprocess(c) for c in clips])
        model.loss(model({"v": inputs, "u": inputs.flip(1)})).loss.backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["plain"].keys() == grads["checkpointed"].keys()
    for name, grad in grads["plain"].items():
        torch.testing.assert_close(grads["checkpointed"][name], grad, rtol=1e-5, atol=1e-6)


def test_a_saved_model_loads_and_embeds_the_same(tmp_path: Path) -> None:
    model = AlignmentModel.from_config({"dim": 8, "towers": {"v": FRAMES}}).eval()
    saved = model.save_pretrained(tmp_path / "saved")
    loaded = AlignmentModel.from_pretrained(saved)
    clips, _ = _clips(2)
    torch.testing.assert_close(loaded.encode("v", clips), model.encode("v", clips))


@ENCODERS
def test_onnx_equals_torch(config: dict, tmp_path: Path) -> None:
    import onnxruntime

    torch.manual_seed(0)
    model = AlignmentModel.from_config({"dim": 8, "towers": {"v": config}}).eval()
    to_onnx(model, tmp_path / "onnx")
    clips, _ = _clips(3)
    tower = model.tower("v")
    inputs = tower.collate([tower.preprocess(c) for c in clips])
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "v.onnx"))
    (exported,) = session.run(None, {"frames": inputs.numpy()})
    with torch.no_grad():
        expected = model.embed("v", inputs)
    np.testing.assert_allclose(exported, expected.numpy(), atol=1e-4)


def test_hf_frames_are_resized_and_cropped_as_open_clip_does() -> None:
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    tower = build_tower({**HF, "frames": 2, "tubelet_size": 1})
    clip = np.random.default_rng(0).integers(0, 256, (2, 40, 50, 3), dtype=np.uint8)
    item = tower.preprocess((clip, 8.0))
    assert item.dtype == torch.float32 and item.shape == (2, 3, 16, 16)
    reference = image_transform_v2(PreprocessCfg(size=16), is_train=False)
    expected = torch.stack([reference(Image.fromarray(frame)) for frame in clip])
    assert (item - expected).abs().mean() < 0.03  # torchvision's bicubic vs PIL's


def test_hf_last_blocks_train_the_top_videomae_layers_and_the_final_norm() -> None:
    tower = build_tower({**HF, "layers": 3, "trainable": {"last_blocks": 1}})
    assert len(tower.blocks()) == 3
    trained = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trained == {
        n
        for n, _ in tower.named_parameters()
        if n.startswith(("encoder.model.encoder.layer.2.", "encoder.model.layernorm."))
    }


def save_videomae(directory: Path, frames: int = 4, size: int = 16) -> Path:
    """A VideoMAE with random weights and its video processor, saved as a user would."""
    import transformers

    torch.manual_seed(1)
    config = transformers.VideoMAEConfig(
        image_size=size, patch_size=8, num_frames=frames, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32,
    )  # fmt: skip
    transformers.VideoMAEModel(config).save_pretrained(directory)
    processor = transformers.VideoMAEVideoProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    processor.save_pretrained(directory)
    return directory


def test_hf_from_a_local_folder_equals_transformers_and_survives_save_and_load(
    tmp_path: Path,
) -> None:
    import transformers

    folder = save_videomae(tmp_path / "videomae")
    config = {"type": "video", "encoder": "hf", "path": str(folder), "frames": 4, "image_size": 16}
    model = AlignmentModel.from_config({"dim": 8, "towers": {"v": config}}).eval()
    reference = transformers.AutoModel.from_pretrained(folder).eval()
    processor = transformers.AutoVideoProcessor.from_pretrained(folder)
    clips, _ = _clips(2)
    tower = model.tower("v")
    inputs = tower.collate([tower.preprocess(c) for c in clips])
    frames = [c[sample_indices(len(c), 1.0, 4, None, augment=False)] for c in clips]
    torch.testing.assert_close(
        inputs, processor(videos=frames, return_tensors="pt")["pixel_values"]
    )
    with torch.no_grad():
        expected = reference(pixel_values=inputs).last_hidden_state.mean(1)
        torch.testing.assert_close(tower(inputs), expected, rtol=0, atol=1e-6)
    saved = model.save_pretrained(tmp_path / "saved")
    torch.testing.assert_close(AlignmentModel.from_pretrained(saved).encode("v", clips),
                               model.encode("v", clips))  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"frames": 8}, r"model.towers.v.frames: 8, but the model at model.towers.v.path "
                        r"takes 4 \(num_frames\); set frames: 4"),
        ({"image_size": 32}, r"model.towers.v.image_size: 32, .* set image_size: 16"),
        ({"path": None, "patch_size": 5}, "encoder hf: patch_size 5 must divide image_size 16"),
        ({"encoder": "conv3d"}, "'path' is only used with encoder: hf"),
        ({"path": "nowhere"}, r"model.towers.v.path: nowhere is not a Hugging Face model"),
    ],
)  # fmt: skip
def test_hf_config_errors_are_one_line_naming_the_field(
    tmp_path: Path, changes: dict, message: str
) -> None:
    folder = save_videomae(tmp_path / "videomae")
    config = {**HF, "path": str(folder), **changes}
    with pytest.raises(ConfigError, match=message) as error:
        AlignmentModel.from_config({"dim": 8, "towers": {"v": config}})
    assert "\n" not in str(error.value)


def test_hf_refuses_a_folder_of_another_model_or_without_a_video_processor(
    tmp_path: Path,
) -> None:
    import transformers

    transformers.PatchTSTConfig().save_pretrained(tmp_path / "patchtst")
    with pytest.raises(ConfigError, match=r"v.path: .* holds a 'patchtst' model; a video"):
        build_tower({**HF, "path": str(tmp_path / "patchtst")}, "model.towers.v")
    folder = save_videomae(tmp_path / "videomae")
    (folder / "video_preprocessor_config.json").unlink()
    with pytest.raises(ConfigError, match=r"v\.path: no video processor in"):
        build_tower({**HF, "path": str(folder)}, "model.towers.v")
