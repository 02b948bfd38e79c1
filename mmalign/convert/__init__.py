"""Hand a trained model to other tools: open_clip, Hugging Face ``transformers``, ONNX.

- :func:`to_open_clip`: image + text towers as an open_clip folder (``open_clip_config.json``
  + ``open_clip_model.safetensors``) that ``open_clip.create_model_and_transforms(
  "local-dir:DIR")`` loads strictly; projections folded in, temperature included.
- :func:`to_hf`: each tower that came from ``transformers`` as a folder ``AutoModel`` loads,
  plus its projection (``projection.safetensors``) and a README saying how to apply it.
- :func:`to_onnx`: each tower with its projection and normalization as an ONNX graph with a
  dynamic batch axis.

The package sits above the model: each converter is one file taking an
:class:`~mmalign.AlignmentModel`, and asks each tower what its format needs (the tower's
``example_raw()``, ONNX input names and axes, ``exportable()``, ``hf_parts()``); ``mmalign
convert`` picks them from one table (:mod:`mmalign.cli.convert`). Importing the open_clip
folders back is the towers' ``pretrained:`` (``mmalign.towers``).

Example:
    >>> from mmalign.convert import to_open_clip
    >>> to_open_clip(model, "exported/open_clip")  # doctest: +SKIP
    PosixPath('exported/open_clip')
"""

from mmalign.convert.hf import to_hf
from mmalign.convert.onnx import to_onnx
from mmalign.convert.open_clip import to_open_clip

__all__ = ["to_hf", "to_onnx", "to_open_clip"]
