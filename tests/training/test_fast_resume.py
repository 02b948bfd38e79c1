"""Resuming in the middle of an epoch passes over the consumed records without decoding them,
and trains on exactly the keys and to exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

import mmalign.data.loader
from mmalign.config import load_config
from mmalign.data import loader_from_config
from mmalign.model import AlignmentModel
from mmalign.training import train
from mmalign.training.sample_keys import read_sample_keys
from mmalign.training.trainer import Trainer
from tests.train_support import model_weights, tiny_config, write_shards


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    directory = tmp_path_factory.mktemp("resume")
    return [
        {"shards": write_shards(directory, "a", 3, 24, seed=4), "weight": 2, "name": "a"},
        {"shards": write_shards(directory, "b", 2, 24, seed=5), "weight": 1, "name": "b"},
    ]  # 120 records: an epoch of 15 batches of 8


def _count_decoding(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    decoded: Counter[str] = Counter()
    original = mmalign.data.loader.to_sample

    def counting(raw: Any, spec: Any) -> Any:
        decoded["records"] += 1
        return original(raw, spec)

    monkeypatch.setattr(mmalign.data.loader, "to_sample", counting)
    return decoded


def _keys(out: Path) -> list[list[str]]:
    return [record["keys"] for record in read_sample_keys(out)[0]]


def test_resume_mid_epoch_skips_decoding_and_continues_exactly(
    tmp_path: Path, sources: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    sections = {
        "data": {"shuffle_buffer": 4},
        "train": {"steps": 12, "save_every": 8, "log_sample_keys": True},
    }
    straight = train(tiny_config(tmp_path / "straight", sources, **sections))  # type: ignore[arg-type]

    interrupted = tmp_path / "interrupted"
    original = Trainer._after_step

    def stop_at_8(self: Trainer) -> None:
        original(self)
        if self.step == 8:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_after_step", stop_at_8)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(interrupted, sources, **sections))  # type: ignore[arg-type]
    monkeypatch.undo()
    position = json.loads((interrupted / "checkpoints/step-00000008/trainer.json").read_text())
    assert position["stream"]["mark"]["batches"] == 8
    (interrupted / ".lock").write_text(f"{socket.gethostname()} 999999\n")

    decoded = _count_decoding(monkeypatch)
    opened: list[str] = []
    read_shard = mmalign.data.loader.read_shard

    def opening(url: str, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(url).name)
        return read_shard(url, *args, **kwargs)

    monkeypatch.setattr(mmalign.data.loader, "read_shard", opening)
    train(tiny_config(interrupted, sources, **sections), resume=True)  # type: ignore[arg-type]

    assert decoded["records"] == 4 * 8  # steps 9..12 only; the 64 consumed records were not
    mark = position["stream"]["mark"]["readers"]["0"]
    assert mark[:2] == [64, 64] and sum(map(sum, mark[2])) == 64 + 3  # + the shuffle buffer
    # a consumed shard none of whose records was still in the shuffle buffer is not opened
    assert "a-000000.tar" not in opened and len(opened) == 4
    assert _keys(interrupted) == _keys(straight.output_dir)
    expected, actual = model_weights(straight.output_dir), model_weights(interrupted)
    for name, value in expected.items():
        assert torch.equal(actual[name], value), name


@pytest.mark.launches  # DataLoader workers
def test_workers_fast_forward_to_the_same_batches(tmp_path: Path, sources: list[dict]) -> None:
    config = load_config(
        tiny_config(tmp_path, sources, data={"workers": 2, "shuffle_buffer": 8})  # type: ignore[arg-type]
    )
    towers = AlignmentModel(config.model).towers
    straight = loader_from_config(config.data, towers, "train", rank=0, world_size=1)
    every = [batch.keys for batch in straight]

    first = loader_from_config(config.data, towers, "train", rank=0, world_size=1)
    consumed = []
    for batch in first:
        consumed.append(batch.keys)
        if len(consumed) == 5:
            break
    mark = first.resume_mark()
    assert mark is not None and mark["batches"] == 4  # the last batch both workers had sent
    again = loader_from_config(config.data, towers, "train", rank=0, world_size=1)
    assert again.fast_forward(json.loads(json.dumps(mark)))  # as a checkpoint stores it
    assert [batch.keys for batch in again] == every[4:]
    assert again.counters == straight.counters

    other_workers = loader_from_config(
        config.data.model_copy(update={"workers": 0}), towers, "train", rank=0, world_size=1
    )
    assert not other_workers.fast_forward(mark)  # another split of the records: replay
