"""The video tower (``type: video``): clips of frames to vectors.

A raw sample is a decoded video file (:class:`mmalign.data.video.EncodedVideo`, what
``data.fields: {video: mp4}`` gives: frames are decoded on demand, only the sampled ones),
an array ``[T, H, W, 3]`` of uint8 RGB frames, or a ``(frames, fps)`` tuple.

``preprocess`` samples ``frames`` frames: without ``fps``, one per equal segment of the whole
clip (the segment's middle frame; a random frame of each segment when augmenting); with
``fps``, ``frames`` consecutive frames at that rate (a random window when augmenting, the
centre one otherwise; a clip too short for the window is sampled over its whole length).
Each frame is resized and cropped as the image tower does (``frames``: the image tower's own
open_clip transform; ``conv3d``: the same steps in torch on all frames at once: bicubic
resize of the short side, centre crop, CLIP's mean and std); spatial augmentation is not
applied, so every frame of a clip keeps one view.

Encoders (``encoder:``):

- ``frames``: an image tower (``image:``, any ``type: image`` config, including an open_clip
  ``pretrained:`` one) applied to every frame, then ``temporal: mean`` (average of the frame
  vectors) or ``temporal: transformer`` (``temporal_layers`` blocks over the frame vectors
  with learned frame positions, then their mean).
- ``conv3d``: a small 3-D convolutional network from scratch (``conv_channels``; each block
  halves height and width, the first ones also time), global average pooling, a linear map
  to ``width``. Its items stay uint8 (``[frames, 3, S, S]``); ``forward`` scales them and
  applies CLIP's mean and std.
- ``hf``: transformers' VideoMAE (``VideoMAEModel``), from a local folder ``path`` (its
  config and video processor, with or without weights) or built from scratch from
  ``frames``, ``image_size``, ``patch_size``, ``tubelet_size``, ``width``, ``heads`` and
  ``layers`` (its processor then resizes and crops to ``image_size`` with bicubic
  resampling and CLIP's mean and std). The tower samples the frames as for the others; the
  video processor turns them into ``pixel_values`` ``[frames, 3, S, S]``, the layout the
  tower's items already have; the hidden states are averaged over all tokens. VideoMAE
  takes a fixed number of frames at a fixed size, as this tower samples them (a folder whose
  ``num_frames`` / ``image_size`` differ from ``frames`` / ``image_size`` is refused), its
  position table is fixed (no interpolation), it has no BatchNorm (its blocks can be
  recomputed) and plain ops (ONNX). ``mmalign convert --to hf`` writes it with its
  processor.

Example:
    >>> import numpy as np
    >>> from mmalign.towers import build_tower
    >>> tower = build_tower({"type": "video", "encoder": "conv3d", "frames": 4,
    ...     "image_size": 16, "conv_channels": [8, 16], "width": 16})
    >>> clip = np.zeros((10, 20, 24, 3), np.uint8)
    >>> tower(tower.collate([tower.preprocess(clip)])).shape
    torch.Size([1, 16])
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from open_clip.transform import PreprocessCfg
from torch import nn

from mmalign.errors import ConfigError
from mmalign.towers.base import HFParts, Tower, build_tower, register_tower
from mmalign.towers.grad_checkpointing import checkpoint_blocks, checkpoint_module
from mmalign.towers.hf_local import checked_size, hf_config, hf_folder, hf_model
from mmalign.towers.layout import Block, stack_blocks
from mmalign.towers.options.video import VideoTowerConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class TemporalTransformer(nn.Module):
    """Transformer blocks over ``[B, frames, width]`` with learned frame positions, then the
    mean over frames."""

    def __init__(self, width: int, frames: int, heads: int, layers: int) -> None:
        super().__init__()
        self.position = nn.Parameter(torch.randn(1, frames, width) * 0.02)
        block = nn.TransformerEncoderLayer(
            width, heads, 4 * width, 0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(frames + self.position)).mean(1)


class Conv3dBlock(nn.Module):
    """3x3x3 convolution, group norm, GELU; stride 2 in height and width (and in time while
    ``halve_time``)."""

    def __init__(self, c_in: int, c_out: int, halve_time: bool) -> None:
        super().__init__()
        stride = (2 if halve_time else 1, 2, 2)
        self.conv = nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1)
        self.norm = nn.GroupNorm(math.gcd(8, c_out), c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.norm(self.conv(x)))


class Conv3dEncoder(nn.Module):
    """``[B, T, 3, H, W]`` clips through 3-D conv blocks, global mean, linear map."""

    def __init__(self, config: VideoTowerConfig) -> None:
        super().__init__()
        channels = [3, *config.conv_channels]
        time_halvings = int(math.log2(config.frames))
        self.layers = nn.ModuleList(
            Conv3dBlock(c_in, c_out, halve_time=index < time_halvings)
            for index, (c_in, c_out) in enumerate(itertools.pairwise(channels))
        )
        self.head = nn.Linear(channels[-1], config.width)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        hidden = clips.transpose(1, 2)  # [B, 3, T, H, W]
        for layer in self.layers:
            hidden = layer(hidden)
        return self.head(hidden.mean((2, 3, 4)))


class HFVideoEncoder(nn.Module):
    """transformers' ``VideoMAEModel`` on ``pixel_values [B, frames, 3, S, S]``, its hidden
    states averaged over all tokens."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state.mean(1)


def videomae_parts(config: VideoTowerConfig) -> tuple[Any, Any]:
    """A from-scratch ``VideoMAEConfig`` of the tower's fields (a final layer norm) and its
    video processor: short side resized to ``image_size`` (bicubic), centre crop, CLIP's mean
    and std, as the image tower."""
    from transformers import VideoMAEConfig, VideoMAEVideoProcessor

    model_config = VideoMAEConfig(
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_frames=config.frames,
        tubelet_size=config.tubelet_size,
        hidden_size=config.width,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        intermediate_size=4 * config.width,
        use_mean_pooling=False,
    )
    standard = PreprocessCfg()
    processor = VideoMAEVideoProcessor(
        size={"shortest_edge": config.image_size},
        crop_size={"height": config.image_size, "width": config.image_size},
        resample=3,  # PIL's BICUBIC
        image_mean=list(standard.mean),
        image_std=list(standard.std),
    )
    return model_config, processor


def sample_indices(
    count: int, fps: float, frames: int, target_fps: float | None, augment: bool
) -> list[int]:
    """Indices of ``frames`` frames of a ``count``-frame clip at ``fps`` (module docstring).

    Example:
        >>> sample_indices(100, 25.0, 4, None, augment=False)
        [12, 37, 62, 87]
        >>> sample_indices(100, 25.0, 4, 5.0, augment=False)
        [42, 47, 52, 57]
    """
    step = fps / target_fps if target_fps else 0.0
    span = step * (frames - 1) + 1
    if target_fps and span <= count:
        start = int(float(torch.rand(())) * (count - span) if augment else (count - span) / 2)
        return [min(count - 1, start + int(step * k)) for k in range(frames)]
    segment = count / frames
    offsets = torch.rand(frames).tolist() if augment else [0.5] * frames
    return [min(count - 1, int(segment * (k + offsets[k]))) for k in range(frames)]


@register_tower("video")
class VideoTower(Tower):
    """Clips ``[B, frames, 3, H, W]`` to ``[B, width]`` (see the module docstring).

    Example:
        >>> from mmalign.towers import build_tower
        >>> tower = build_tower({"type": "video", "frames": 2, "temporal": "transformer",
        ...     "heads": 2, "image": {"embed_dim": 8, "vision_cfg": {"image_size": 16,
        ...     "patch_size": 8, "width": 16, "layers": 2, "head_width": 8}}})
        >>> len(tower.blocks())  # the image tower's 2 blocks, then the temporal block
        3
    """

    config_class = VideoTowerConfig
    config: VideoTowerConfig
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor
    processor: Any
    """``hf``: the video processor (frames to ``pixel_values``)."""
    onnx_input = "frames"

    def __init__(
        self, config: VideoTowerConfig, field: str = "tower", base_dir: Path | None = None
    ) -> None:
        super().__init__(config, field, base_dir)
        self.temporal: TemporalTransformer | None = None
        if config.encoder == "frames":
            self.frame_tower = build_tower(
                {"type": "image", **config.image}, f"{field}.image", base_dir
            )
            self.width = self.frame_tower.width
            self.pretrained_logit_scale = self.frame_tower.pretrained_logit_scale
            if config.temporal == "transformer":
                self.temporal = TemporalTransformer(
                    self.width, config.frames, config.heads, config.temporal_layers
                )
        elif config.encoder == "hf":
            model = self._videomae()
            self.encoder: nn.Module = HFVideoEncoder(model)
            self.width = int(model.config.hidden_size)
        else:
            self.encoder = Conv3dEncoder(config)
            self.width = config.width
            standard = PreprocessCfg()
            self.register_buffer("pixel_mean", torch.tensor(standard.mean)[:, None, None], False)
            self.register_buffer("pixel_std", torch.tensor(standard.std)[:, None, None], False)

    def _videomae(self) -> PreTrainedModel:
        """``encoder: hf``: the ``path`` folder's VideoMAE and video processor (checked against
        ``frames`` and ``image_size``), or both built from the config's fields."""
        from transformers import AutoModel, AutoVideoProcessor

        if self.config.path is None:
            model_config, self.processor = videomae_parts(self.config)
            return AutoModel.from_config(model_config, dtype=torch.float32)
        directory = hf_folder(self)
        model_config = hf_config(self, directory, "videomae")
        checked_size(self, "frames", self.config.frames, model_config.num_frames, "num_frames")
        size = self.config.image_size
        checked_size(self, "image_size", size, model_config.image_size, "image_size")
        try:
            self.processor = AutoVideoProcessor.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"{self.field}.path: no video processor in {directory} (save one with "
                f"processor.save_pretrained(dir)): {error}"
            ) from error
        return hf_model(self, directory, "videomae", model_config)

    def preprocess(self, raw: Any, augment: bool = False) -> torch.Tensor:
        """Sample ``frames`` frames (``augment``: randomly, module docstring), decode only
        those, resize and crop each: ``[frames, 3, H, W]``."""
        frames = self._sampled_frames(raw, augment)
        if self.config.encoder == "frames":
            return torch.stack([self.frame_tower.preprocess(frame) for frame in frames])
        if self.config.encoder == "hf":
            return self.processor(videos=[frames], return_tensors="pt")["pixel_values"][0]
        return self._resized(frames)

    def _resized(self, frames: np.ndarray) -> torch.Tensor:
        """``conv3d``: all frames at once, as open_clip's default eval transform resizes one
        image (bicubic resize of the short side to ``image_size`` rounded to uint8 as PIL
        does, centre crop); uint8 ``[T, 3, S, S]`` (``forward`` applies CLIP's mean/std):
        a quarter of float32's memory between the loader's processes."""
        size = self.config.image_size
        planar = frames.transpose(0, 3, 1, 2)  # a view; numpy copies uint8 far faster
        height, width = planar.shape[-2:]
        if min(height, width) != size:
            scale = size / min(height, width)
            shape = (max(size, round(height * scale)), max(size, round(width * scale)))
            resized = nn.functional.interpolate(
                torch.from_numpy(np.ascontiguousarray(planar)).float(),
                shape,
                mode="bicubic",
                antialias=True,
                align_corners=False,
            )
            planar = resized.round().clamp(0, 255).to(torch.uint8).numpy()
        top, left = (planar.shape[-2] - size) // 2, (planar.shape[-1] - size) // 2
        return torch.from_numpy(
            np.ascontiguousarray(planar[..., top : top + size, left : left + size])
        )

    def _sampled_frames(self, raw: Any, augment: bool) -> np.ndarray:
        fps = None
        if isinstance(raw, tuple) and len(raw) == 2:
            raw, fps = raw
        if hasattr(raw, "decode_frames"):  # an EncodedVideo: decode the sampled frames only
            indices = sample_indices(
                raw.frame_count, raw.fps, self.config.frames, self.config.fps, augment
            )
            return np.asarray(raw.decode_frames(indices))
        clip = np.asarray(raw)
        if clip.ndim != 4 or clip.shape[-1] != 3 or clip.shape[0] < 1 or clip.dtype != np.uint8:
            raise ValueError(
                f"{self.field}: a video is [T, H, W, 3] uint8 frames (T >= 1), got "
                f"{clip.dtype} {list(clip.shape)}"
            )
        if fps is None and self.config.fps is not None:
            raise ValueError(f"{self.field}.fps is set: give frames as (frames, fps)")
        indices = sample_indices(
            len(clip), fps or 1.0, self.config.frames, self.config.fps, augment
        )
        return clip[indices]

    def collate(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        """One copy into the batch (numpy's stack: torch's copies uint8 many times slower)."""
        return torch.from_numpy(np.stack([item.numpy() for item in items]))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """``[B, frames, 3, H, W]`` (``conv3d``: uint8) to ``[B, width]``."""
        if self.config.encoder == "hf":
            return self.encoder(inputs)
        if self.config.encoder == "conv3d":
            pixels = inputs.to(self.pixel_mean.dtype) / 255.0
            return self.encoder((pixels - self.pixel_mean) / self.pixel_std)
        batch, frames = inputs.shape[:2]
        vectors = self.frame_tower(inputs.flatten(0, 1)).reshape(batch, frames, -1)
        return vectors.mean(1) if self.temporal is None else self.temporal(vectors)

    def blocks(self) -> list[Block]:
        """``frames``: the image tower's blocks, then the temporal transformer's; ``conv3d``:
        its conv blocks; ``hf``: VideoMAE's layers."""
        if self.config.encoder == "hf":
            return stack_blocks(self)
        if self.config.encoder == "conv3d":
            return [[layer] for layer in self.encoder.get_submodule("layers").children()]
        temporal = [] if self.temporal is None else [[b] for b in self.temporal.layers.layers]
        return self.frame_tower.blocks() + temporal

    def enable_gradient_checkpointing(self) -> bool:
        """The image tower's own switch and each temporal block; the conv blocks and
        VideoMAE's layers through :meth:`blocks`."""
        if self.config.encoder != "frames":
            return checkpoint_blocks(self.blocks())
        done = self.frame_tower.enable_gradient_checkpointing()
        if self.temporal is not None:
            for layer in self.temporal.layers.layers:
                checkpoint_module(layer)
        return done or self.temporal is not None

    def example_raw(self) -> Any:
        """A random clip of ``frames`` 48x40 frames (at 8 fps)."""
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (self.config.frames, 48, 40, 3), dtype=np.uint8), 8.0

    def hf_parts(self) -> HFParts | None:
        """``encoder: hf``: the ``VideoMAEModel`` and its video processor, pooled over all
        tokens."""
        encoder = getattr(self, "encoder", None)  # ``frames`` has none
        if not isinstance(encoder, HFVideoEncoder):
            return None
        return HFParts(encoder.model, self.processor, "tokens")

    def save_files(self, directory: Path) -> dict[str, Any]:
        """``frames``: the image tower's resolved config; ``hf``: VideoMAE's config and video
        processor (weights live in the model's safetensors)."""
        encoder = getattr(self, "encoder", None)  # ``frames`` has none
        if isinstance(encoder, HFVideoEncoder):
            encoder.model.config.save_pretrained(directory)
            self.processor.save_pretrained(directory)
            return {"path": "."}
        if self.config.encoder == "conv3d":
            return {}
        updates = self.frame_tower.save_files(directory)
        merged = {**self.config.image, **updates}
        return {"image": {key: value for key, value in merged.items() if value is not None}}
