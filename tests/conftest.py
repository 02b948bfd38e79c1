"""Shared test setup: offline, deterministic, small thread pools (CI has 2 cores)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


LAUNCHING_MODULES = (
    "test_train_fsdp",
    "test_train_multinode",
    "test_wheel",
    "test_kill_training",
    "test_train_distributed",
    "test_positives_distributed",
    "test_matryoshka",
    "test_objectives_distributed",
)
"""Test modules that start several processes (tens of seconds each): run first, so that
``pytest -n 2`` does not end with one worker busy on them while the other idles."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.module.__name__.split(".")[-1] not in LAUNCHING_MODULES)
