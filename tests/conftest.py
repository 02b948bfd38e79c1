"""Shared test setup: offline, deterministic, small thread pools (CI has 2 cores), the
``launches`` marker kept honest, and docstrings with no runnable example left out.

Every test that starts another process (``subprocess``, ``os.fork``, ``torchrun``,
``accelerate launch``, ``torch.multiprocessing.spawn``, DataLoader workers, compile workers)
carries ``@pytest.mark.launches`` (per test, or ``pytestmark`` for a whole module).
``make test-fast`` runs the others (``-m "not launches"``); an unmarked test that starts a
process fails, so the marker cannot drift from what the tests do.
"""

import doctest
import multiprocessing.util
import os
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

torch.set_num_threads(1)

_launched = [0]
"""Processes this pytest process started so far (forks, subprocesses, spawned children)."""


def _count_fork() -> None:
    _launched[0] += 1


def _counting(start: Callable[..., Any]) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        _launched[0] += 1
        return start(*args, **kwargs)

    return counted


os.register_at_fork(before=_count_fork)
subprocess.Popen._execute_child = _counting(subprocess.Popen._execute_child)  # type: ignore[attr-defined]
multiprocessing.util.spawnv_passfds = _counting(multiprocessing.util.spawnv_passfds)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


_BEFORE = pytest.StashKey[int]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_BEFORE] = _launched[0]  # before any fixture, module-scoped ones included


@pytest.fixture(autouse=True)
def _launches_are_marked(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    started = _launched[0] - request.node.stash[_BEFORE]
    if started and request.node.get_closest_marker("launches") is None:
        pytest.fail(
            f"{request.node.nodeid} started {started} process(es) but is not marked "
            "@pytest.mark.launches (see tests/conftest.py)"
        )


def _all_skipped(item: pytest.Item) -> bool:
    """A docstring whose every example is ``# doctest: +SKIP`` (it needs files, a trained
    model or processes): documentation, not a test."""
    test = getattr(item, "dtest", None)
    return test is not None and all(
        example.options.get(doctest.SKIP, False) for example in test.examples
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Docstrings with no example that runs are deselected (not counted as skipped tests);
    tests that launch processes (tens of seconds each) go first, so that ``pytest -n 2`` does
    not end with one worker busy on them while the other idles."""
    shown_only = [item for item in items if _all_skipped(item)]
    if shown_only:
        config.hook.pytest_deselected(items=shown_only)
        items[:] = [item for item in items if not _all_skipped(item)]
    items.sort(key=lambda item: item.get_closest_marker("launches") is None)
