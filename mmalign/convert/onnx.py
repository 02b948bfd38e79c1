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
windowed DFT basis (:class:`~mmalign.towers.log_mel.ConvLogMel`, the same numbers; the
tower's ``exportable()`` swaps it in). What each tower needs (an example input, the input
names and dynamic axes) are its own methods (:class:`~mmalign.towers.Tower`). Each graph is
checked with ``onnx.checker``.

Example:
    >>> to_onnx(model, "exported/onnx")  # doctest: +SKIP
    >>> import onnxruntime
    >>> session = onnxruntime.InferenceSession("exported/onnx/image.onnx")  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmalign.convert.common import output_directory
from mmalign.errors import UserError
from mmalign.extras import missing_extra
from mmalign.files import write_json
from mmalign.model import AlignmentModel

OPSET = 17


class TowerEmbedding(nn.Module):
    """A tower + projection + L2 normalization over named tensor inputs (what ONNX sees)."""

    def __init__(self, tower: nn.Module, projection: nn.Module, names: list[str] | None) -> None:
        super().__init__()
        self.tower, self.projection, self.names = tower, projection, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        inputs: Any = tensors[0] if self.names is None else dict(zip(self.names, tensors))
        return F.normalize(self.projection(self.tower(inputs)), dim=-1)


def to_onnx(
    model: AlignmentModel, directory: str | Path, modalities: list[str] | None = None
) -> Path:
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
    raws = {name: model.tower(name).example_raw() for name in names}  # refuse before writing
    was_training = model.training
    model.eval()
    manifest = {}
    try:
        with output_directory(directory, "onnx") as staging:
            for name in names:
                manifest[name] = _export(model, name, raws[name], staging / f"{name}.onnx")
                onnx.checker.check_model(str(staging / f"{name}.onnx"))
            write_json(staging / "onnx.json", manifest, sort_keys=False)
    finally:
        model.train(was_training)
    return Path(directory)


def _export(model: AlignmentModel, name: str, raw: Any, path: Path) -> dict[str, Any]:
    tower = model.tower(name)
    inputs = tower.collate([tower.preprocess(raw), tower.preprocess(raw)])
    if isinstance(inputs, dict):
        input_names = list(inputs)
        tensors = tuple(inputs[key] for key in input_names)
        module = TowerEmbedding(tower, model.projections[name], input_names)
    else:
        input_names = [tower.onnx_input]
        tensors = (inputs,)
        module = TowerEmbedding(tower, model.projections[name], None)
    dynamic = tower.onnx_axes(input_names)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # its fused kernel has no ONNX form
    try:
        with torch.no_grad(), warnings.catch_warnings(), tower.exportable():
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
