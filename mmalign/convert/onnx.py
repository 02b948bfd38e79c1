"""mmalign -> ONNX: each tower with its projection and L2 normalization as one graph.

``<directory>/<modality>.onnx`` takes the tower's collated inputs (what ``tower.collate``
returns: ``pixel_values`` for images, ``input_ids`` for open_clip text, the tokenizer's
``input_ids`` + ``attention_mask`` for Hugging Face text, ``waveform`` + ``length`` for the
audio encoders, ``features`` for tabular rows) and returns ``embedding`` ``[B, dim]``, equal
to ``model.embed(modality, inputs)``. The batch axis is dynamic (and the token axis of
Hugging Face text). ``onnx.json`` lists each file's inputs; preprocessing (resizing,
tokenizing, resampling) stays outside the graph: run ``tower.preprocess`` + ``collate`` or
the same steps in the serving language. Graph towers are refused (their input is a PyG batch,
not tensors). Exported with torch's TorchScript-based ONNX exporter (opset 17), which has no
complex STFT: the audio towers' log-mel is exported as a strided convolution with the
windowed DFT basis (:class:`ConvLogMel`, the same numbers). Each graph is checked with
``onnx.checker``.

Example:
    >>> to_onnx(model, "exported/onnx")  # doctest: +SKIP
    >>> import onnxruntime
    >>> session = onnxruntime.InferenceSession("exported/onnx/image.onnx")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmalign.convert.common import output_directory
from mmalign.errors import UserError
from mmalign.extras import missing_extra
from mmalign.towers.log_mel import LogMel

OPSET = 17
TENSOR_NAMES = {"image": "pixel_values", "text": "input_ids", "tabular": "features"}
"""The ONNX input name of towers whose collated input is one tensor."""


class TowerEmbedding(nn.Module):
    """A tower + projection + L2 normalization over named tensor inputs (what ONNX sees)."""

    def __init__(self, tower: nn.Module, projection: nn.Module, names: list[str] | None) -> None:
        super().__init__()
        self.tower, self.projection, self.names = tower, projection, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        inputs: Any = tensors[0] if self.names is None else dict(zip(self.names, tensors))
        return F.normalize(self.projection(self.tower(inputs)), dim=-1)


class ConvLogMel(nn.Module):
    """:class:`~mmalign.towers.log_mel.LogMel` with its STFT as a strided 1-d convolution over
    the reflect-padded waveform with the windowed cosine and sine DFT rows (real ONNX ops)."""

    def __init__(self, log_mel: LogMel) -> None:
        super().__init__()
        n_fft, width = log_mel.n_fft, log_mel.win_length
        window = torch.zeros(n_fft, dtype=torch.float64)
        start = (n_fft - width) // 2  # torch.stft centres a shorter window inside n_fft
        window[start : start + width] = log_mel.window.double()
        angle = (
            2
            * math.pi
            / n_fft
            * torch.outer(torch.arange(n_fft // 2 + 1, dtype=torch.float64), torch.arange(n_fft))
        )
        basis = torch.cat([torch.cos(angle) * window, -torch.sin(angle) * window])
        self.register_buffer("basis", basis.float()[:, None, :], persistent=False)
        self.register_buffer("filters", log_mel.filters, persistent=False)
        self.n_fft, self.hop_length, self.log_floor = n_fft, log_mel.hop_length, log_mel.log_floor
        self.frame_lengths = log_mel.frame_lengths

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        half = self.n_fft // 2
        padded = F.pad(waveform.float()[:, None, :], (half, half), mode="reflect")
        real, imag = F.conv1d(padded, self.basis, stride=self.hop_length).chunk(2, dim=1)
        mel = torch.einsum("fm,bft->bmt", self.filters, real.square() + imag.square())
        return torch.log(mel.clamp(min=self.log_floor))


@contextmanager
def exportable(tower: nn.Module) -> Iterator[None]:
    """Swap a tower's :class:`LogMel` for :class:`ConvLogMel` while it is exported."""
    log_mel = getattr(tower, "log_mel", None)
    if isinstance(log_mel, LogMel):
        tower.log_mel = ConvLogMel(log_mel)
    try:
        yield
    finally:
        if isinstance(log_mel, LogMel):
            tower.log_mel = log_mel


def example_raw(tower: Any) -> Any:
    """A raw sample of the tower's modality, to trace the graph with."""
    kind = tower.config.type
    rng = np.random.default_rng(0)
    if kind == "image":
        return rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    if kind == "text":
        return "a photo of the number seven"
    if kind == "audio":
        return (rng.standard_normal(tower.clip_samples).astype(np.float32), tower.sample_rate)
    if kind == "tabular":
        return rng.standard_normal(tower.in_features).astype(np.float32).tolist()
    raise UserError(
        f"a {kind} tower's inputs are not plain tensors, so ONNX cannot take them "
        f"({tower.field}.type: {kind}); "
        "pick the other towers with --modality"
    )


def to_onnx(model: Any, directory: str | Path, modalities: list[str] | None = None) -> Path:
    """Write ``<modality>.onnx`` for each tower of ``model`` (or ``modalities``) and
    ``onnx.json``; returns ``directory`` (see the module docstring).

    Example:
        >>> to_onnx(model, "exported/onnx", ["image", "text"])  # doctest: +SKIP
        PosixPath('exported/onnx')
    """
    try:
        import onnx
    except ImportError:
        raise missing_extra("onnx", "mmalign convert --to onnx") from None

    names = modalities or list(model.modalities)
    unknown = [name for name in names if name not in model.modalities]
    if unknown:
        raise UserError(
            f"unknown modality {', '.join(unknown)} (--modality); this model has "
            f"{', '.join(model.modalities)}"
        )
    raws = {name: example_raw(model.towers[name]) for name in names}  # refuse before writing
    was_training = model.training
    model.eval()
    manifest = {}
    try:
        with output_directory(directory) as staging:
            for name in names:
                manifest[name] = _export(model, name, raws[name], staging / f"{name}.onnx")
                onnx.checker.check_model(str(staging / f"{name}.onnx"))
            (staging / "onnx.json").write_text(json.dumps(manifest, indent=2) + "\n")
    finally:
        model.train(was_training)
    return Path(directory)


def _export(model: Any, name: str, raw: Any, path: Path) -> dict[str, Any]:
    tower = model.towers[name]
    inputs = tower.collate([tower.preprocess(raw), tower.preprocess(raw)])
    if isinstance(inputs, dict):
        input_names = list(inputs)
        tensors = tuple(inputs[key] for key in input_names)
        module = TowerEmbedding(tower, model.projections[name], input_names)
    else:
        input_names = [TENSOR_NAMES[tower.config.type]]
        tensors = (inputs,)
        module = TowerEmbedding(tower, model.projections[name], None)
    dynamic = {key: {0: "batch"} for key in input_names}
    if tower.config.type == "text" and isinstance(inputs, dict):
        dynamic = {key: {0: "batch", 1: "tokens"} for key in input_names}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # its fused kernel has no ONNX form
    try:
        with torch.no_grad(), warnings.catch_warnings(), exportable(tower):
            warnings.simplefilter("ignore")  # the exporter's tracer warnings about Python ints
            torch.onnx.export(
                module,
                tensors,
                str(path),
                input_names=input_names,
                output_names=["embedding"],
                dynamic_axes={**dynamic, "embedding": {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return {
        "file": path.name,
        "inputs": {
            key: str(tensor.dtype).removeprefix("torch.")
            for key, tensor in zip(input_names, tensors)
        },
        "output": "embedding",
        "dim": model.dim,
    }
