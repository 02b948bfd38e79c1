"""mmalign -> Hugging Face: each tower that came from ``transformers`` as a folder that
``AutoModel.from_pretrained`` loads, plus its projection and a README on applying it.

For a text tower with ``backend: hf`` and an audio, video or time-series tower with
``encoder: hf``, ``<directory>/<modality>/`` holds the encoder's ``save_pretrained`` output
(config + weights), its tokenizer, feature extractor or video processor, and
``projection.safetensors``: ``weight`` ``[dim, width]`` (the identity for
``projection: none``), with the pooling in the file's metadata. A tower that transforms its
inputs itself before the model (the time-series tower's per-channel standardization) also
gets ``inputs.safetensors`` with those tensors (``mean``, ``std``). mmalign's
embedding of a sample is ``normalize(pool(last_hidden_state) @ weight.T)``; ``README.md``
spells the pooling out per tower. Towers of other kinds are not written (``--to onnx`` or
``--to open_clip`` carries those).

Example:
    >>> to_hf(model, "exported/hf")  # doctest: +SKIP
    >>> import transformers
    >>> bert = transformers.AutoModel.from_pretrained("exported/hf/text")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from mmalign.convert.common import output_directory, projection_matrix
from mmalign.errors import UserError
from mmalign.files import naming_errors
from mmalign.model import AlignmentModel
from mmalign.towers import HFParts

PROJECTION = "projection.safetensors"
INPUTS = "inputs.safetensors"
POOLING = {
    "cls": "the first token's hidden state: `hidden[:, 0]`",
    "mean": "the mean over real tokens: `(hidden * mask[..., None]).sum(1) / mask.sum(1)`",
    "eos": "the last real token's hidden state (the last 1 of `attention_mask`)",
    "frames": "the mean over the frames the feature extractor's `attention_mask` marks as real "
    "(mapped to encoder frames with `_get_feat_extract_output_lengths`)",
    "tokens": "the mean over all tokens: `hidden.mean(1)`",
    "channels": "`hidden` is `[B, C, patches, width]`: the mean over patches, then over the "
    "channels with an observed value: `w = mask.any(1)[..., None]` (`mask`: "
    "`past_observed_mask`), `(hidden.mean(2) * w).sum(1) / w.sum(1)`",
}
PREPROCESSING = {
    "channels": "none: `past_values = ((signal - mean[:, None]) / std[:, None])` with missing "
    "values (NaN) set to 0, transposed to `[B, T, C]`; `past_observed_mask` is 1 where the "
    "signal is not NaN (`mean`, `std`: `inputs.safetensors`)",
}


def hf_towers(model: AlignmentModel) -> dict[str, HFParts]:
    """Modality -> :class:`~mmalign.towers.HFParts` of every tower that came from
    ``transformers`` (the tower's ``hf_parts()``)."""
    parts = {name: model.tower(name).hf_parts() for name in model.modalities}
    return {name: part for name, part in parts.items() if part is not None}


def to_hf(model: AlignmentModel, directory: str | Path) -> Path:
    """Write every ``transformers`` tower of ``model`` under ``directory`` (see the module
    docstring); returns ``directory``.

    Example:
        >>> to_hf(model, "exported/hf")  # doctest: +SKIP
        PosixPath('exported/hf')
    """
    towers = hf_towers(model)
    if not towers:
        kinds = ", ".join(f"{name}: {model.config.towers[name].type}" for name in model.towers)
        raise UserError(
            f"no tower of this model came from transformers ({kinds}) "
            "(model.towers.<modality>.backend / encoder: hf); use --to open_clip or --to onnx"
        )
    rows = []
    with output_directory(directory, "hf") as staging:
        for name, part in towers.items():
            module, processor, pooling = part.model, part.processor, part.pooling
            folder = staging / name
            module.save_pretrained(folder)
            if processor is not None:
                processor.save_pretrained(folder)
            if part.inputs:
                inputs = {
                    key: value.detach().float().contiguous().cpu()
                    for key, value in part.inputs.items()
                }
                with naming_errors(folder / INPUTS):
                    save_file(inputs, folder / INPUTS, {"modality": name})
            weight = projection_matrix(model.projections[name], "model.projection")
            if weight is None:
                weight = torch.eye(model.tower(name).width)
            metadata = {"pooling": pooling, "normalize": "l2", "modality": name}
            tensors = {"weight": weight.detach().float().contiguous().cpu()}
            with naming_errors(folder / PROJECTION):
                save_file(tensors, folder / PROJECTION, metadata)
            preprocessing = PREPROCESSING.get(pooling, f"`{type(processor).__name__}`")
            rows.append((name, type(module).__name__, preprocessing, pooling, weight))
        (staging / "README.md").write_text(_readme(rows))
    return Path(directory)


def _readme(rows: list[tuple[str, str, str, str, torch.Tensor]]) -> str:
    lines = [
        "# mmalign towers for transformers",
        "",
        "Written by `mmalign convert MODEL --to hf`. Each folder loads with",
        "`transformers.AutoModel.from_pretrained(folder)` and its `AutoTokenizer` /",
        "`AutoFeatureExtractor` / `AutoVideoProcessor` (an encoder taken from an",
        "encoder-decoder model, such as Whisper's, loads with its own class, named below).",
        "mmalign's embedding of a sample:",
        "",
        "```python",
        "import torch, torch.nn.functional as F",
        "from safetensors.torch import load_file",
        "hidden = model(**inputs).last_hidden_state  # [B, T, width]; PatchTST: [B, C, P, width]",
        "pooled = ...                                     # the folder's pooling, below",
        'weight = load_file(f"{folder}/projection.safetensors")["weight"]  # [dim, width]',
        "embedding = F.normalize(pooled @ weight.T, dim=-1)",
        "```",
        "",
        "| folder | class | preprocessing | pooling | width -> dim |",
        "|---|---|---|---|---|",
    ]
    for name, cls, processor, pooling, weight in rows:
        size = f"{weight.shape[1]} -> {weight.shape[0]}"
        lines.append(f"| `{name}/` | `{cls}` | {processor} | {POOLING[pooling]} | {size} |")
    return "\n".join(lines) + "\n"
