"""The examples in the docstrings of the ground floor and the objectives run as written."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "mmalign",
    "mmalign.errors",
    "mmalign.registry",
    "mmalign.batch",
    "mmalign.dist",
    "mmalign.files",
    "mmalign.config",
    "mmalign.objectives",
    "mmalign.objectives.base",
    "mmalign.objectives.clip",
    "mmalign.objectives.anchored",
    "mmalign.objectives.symile",
    "mmalign.objectives.matryoshka",
    "mmalign.eval.label_free",
    "mmalign.training.parallel",
    "mmalign.training.parallel.base",
    "mmalign.training.parallel.ddp",
    "mmalign.training.parallel.fsdp",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0, f"{result.failed} docstring examples of {name} failed"
