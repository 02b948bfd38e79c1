"""Optional dependencies, grouped by use as the extras of ``pip install 'mmalign[...]'``.

The core install imports mmalign and trains non-graph towers; each extra adds one use. Code
that needs an extra imports it inside ``try`` and turns the ``ImportError`` into
:func:`missing_extra`'s one-line error that names the extra to install (``[all]`` installs
every extra, ``[dev]`` every extra and the tools of ``make test``).

Example:
    >>> print(missing_extra("index", "mmalign search"))
    mmalign search: the faiss-cpu package is not installed; pip install 'mmalign[index]'
"""

from __future__ import annotations

from mmalign.errors import UserError

EXTRAS = {
    "graph": "torch_geometric",
    "index": "faiss-cpu",
    "onnx": "onnx",
    "lora": "peft",
    "tensorboard": "tensorboard",
    "plots": "matplotlib",
    "serve": "fastapi",
    "video": "av",
}
"""Each extra of pyproject.toml and the package(s) it installs."""


class MissingExtraError(UserError, ImportError):
    """An optional package is not installed; the message names the extra that installs it."""


def missing_extra(extra: str, needed_for: str, alternative: str = "") -> MissingExtraError:
    """The error for ``needed_for`` (what needs the package: a feature, a field, a flag)
    when the package of ``extra`` is missing; ``alternative`` adds another way out.

    Example (the doctest's ELLIPSIS stands for ``set train.plots: false``):
        >>> print(missing_extra("plots", "train.plots", "or set train.plots: false"))
        train.plots: the matplotlib package is not installed; pip install 'mmalign[plots]' or ...
    """
    fix = f"pip install 'mmalign[{extra}]'" + (f" {alternative}" if alternative else "")
    return MissingExtraError(f"{needed_for}: the {EXTRAS[extra]} package is not installed; {fix}")
