"""``data.group_field`` fills ``Batch.groups``; ``data.views`` samples one of a record's items per
pass (reproducibly) or expands the record to one row per item, other modalities encoded once."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mmalign.config import ConfigError, DataConfig
from mmalign.data import loader_from_config, make_loader
from mmalign.model import AlignmentModel
from tests.data.test_loader import EchoTower, write_shard


def _blake(text: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True
    )


class CountingTower(EchoTower):
    """An echo tower that counts ``preprocess`` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def preprocess(self, raw: Any, augment: bool = False) -> Any:
        self.calls += 1
        return super().preprocess(raw, augment)


def _captioned(tmp_path: Path) -> str:
    """4 records: a label and an image-like payload, 1, 3, 2 and 3 captions."""
    records = [
        {"__key__": "r0", "bin": b"I0", "txt": "only", "cls": 0, "json": {"patient": "p-a"}},
        {"__key__": "r1", "bin": b"I1", "txt": "a", "1.txt": "b", "2.txt": "c", "cls": 1},
        {
            "__key__": "r2",
            "bin": b"I2",
            "1.txt": "x",
            "2.txt": "y",
            "cls": 2,
            "json": {"patient": 7},
        },
        {"__key__": "r3", "bin": b"I3", "txt": "u", "1.txt": "v", "3.txt": "w", "cls": 1},
    ]
    return write_shard(tmp_path / "views-000000.tar", records)


def _load(shards, views=None, group_field=None, seed=0, towers=None, epochs=1):
    towers = towers or {"image": EchoTower(), "text": EchoTower()}
    loader = make_loader(
        shards,
        towers,
        {"image": "bin", "text": "txt"},
        batch_size=8,
        views=views,
        group_field=group_field,
        seed=seed,
    )
    return [batch for _ in range(epochs) for batch in loader]


def _texts(batch) -> list[str]:
    return [value for value, _ in batch.inputs["text"]]


def test_group_field_integers_strings_and_missing(tmp_path):
    shards = _captioned(tmp_path)
    (batch,) = _load(shards, group_field="cls")
    assert batch.groups.tolist() == [0, 1, 2, 1]
    (batch,) = _load(shards, group_field="json:patient")
    url = shards
    assert batch.groups.tolist() == [
        _blake("p-a"),
        _blake(f"record:{url}:r1"),  # no json: its own group
        7,
        _blake(f"record:{url}:r3"),
    ]
    (again,) = _load(shards, group_field="json:patient")
    assert torch.equal(again.groups, batch.groups)
    (plain,) = _load(shards)
    assert plain.groups is None


def test_a_bad_group_is_skipped_and_counted(tmp_path):
    shards = write_shard(
        tmp_path / "bad-000000.tar",
        [
            {"__key__": "ok", "txt": "t", "json": {"g": "a"}},
            {"__key__": "bad", "txt": "t", "json": {"g": [1, 2]}},
        ],
    )
    loader = make_loader(shards, {"text": EchoTower()}, {"text": "txt"}, 4, group_field="json:g")
    (batch,) = list(loader)
    assert batch.keys == ["ok"] and loader.counters["skipped/bad_group"] == 1


def test_sample_view_is_seeded_reproducible_and_varies_per_epoch(tmp_path):
    shards = _captioned(tmp_path)
    first = [_texts(batch) for batch in _load(shards, views={"text": "sample"}, epochs=6)]
    second = [_texts(batch) for batch in _load(shards, views={"text": "sample"}, epochs=6)]
    assert first == second
    for epoch in first:
        assert epoch[0] == "only" and epoch[1] in "abc" and epoch[2] in "xy" and epoch[3] in "uvw"
    assert len({tuple(epoch) for epoch in first}) > 1  # a new pick each pass
    assert len({epoch[1] for epoch in first}) > 1 and len({epoch[3] for epoch in first}) > 1
    other_seed = [_texts(b) for b in _load(shards, views={"text": "sample"}, seed=1, epochs=6)]
    assert other_seed != first


def test_validation_reads_the_first_item(tmp_path):
    shards = _captioned(tmp_path)
    data = DataConfig(val=shards, fields={"image": "bin", "text": "txt"}, views={"text": "expand"})
    (batch,) = list(loader_from_config(data, {"image": EchoTower(), "text": EchoTower()}, "val"))
    assert _texts(batch) == ["only", "a", "x", "u"] and batch.groups is None


def test_json_list_items(tmp_path):
    shards = write_shard(
        tmp_path / "json-000000.tar", [{"__key__": "k", "json": ["p", "q", "r"], "bin": b"I"}]
    )
    loader = make_loader(
        shards,
        {"image": EchoTower(), "text": EchoTower()},
        {"image": "bin", "text": "json"},
        4,
        views={"text": "expand"},
    )
    (batch,) = list(loader)
    assert _texts(batch) == ["p", "q", "r"] and batch.keys == ["k"] * 3


def test_expand_gives_one_row_per_caption_sharing_a_group(tmp_path):
    shards = _captioned(tmp_path)
    towers = {"image": CountingTower(), "text": CountingTower()}
    (batch,) = _load(shards, views={"text": "expand"}, towers=towers)
    assert _texts(batch) == ["only", "a", "b", "c", "x", "y", "u", "v", "w"]
    assert batch.keys == ["r0", "r1", "r1", "r1", "r2", "r2", "r3", "r3", "r3"]
    groups = batch.groups.tolist()
    assert [len(set(groups[a:b])) for a, b in [(1, 4), (4, 6), (6, 9)]] == [1, 1, 1]
    assert len(set(groups)) == 4
    # the image: one item per record, preprocessed once, shared by the record's rows
    assert [value for value, _ in batch.inputs["image"]] == [b"I0", b"I1", b"I2", b"I3"]
    assert batch.item_index["image"].tolist() == [0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert towers["image"].calls == 4 and towers["text"].calls == 9
    (with_field,) = _load(shards, views={"text": "expand"}, group_field="cls")
    assert with_field.groups.tolist() == [0, 1, 1, 1, 2, 2, 1, 1, 1]


def test_expanded_record_is_encoded_once_by_the_model(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for index in range(3):
        record = {"__key__": f"k{index}", "a.npy": rng.normal(size=3).astype(np.float32)}
        for item in range(1, 4):
            record[f"{item}.b.npy"] = rng.normal(size=3).astype(np.float32)
        records.append(record)
    shards = write_shard(tmp_path / "model-000000.tar", records)
    towers = {name: {"type": "tabular", "in_features": 3, "hidden": 4} for name in "ab"}
    model = AlignmentModel.from_config(
        {"dim": 4, "towers": towers, "objective": {"name": "clip", "positives": "multi"}}
    )
    loader = make_loader(
        shards, model.towers, {"a": "a.npy", "b": "b.npy"}, 8, views={"b": "expand"}
    )
    (batch,) = list(loader)
    assert len(batch) == 9
    rows_encoded = []
    model.towers["a"].register_forward_hook(lambda _, args, out: rows_encoded.append(len(out)))
    embeddings = model(batch)
    assert rows_encoded == [3]
    for start in (0, 3, 6):
        block = embeddings["a"][start : start + 3]
        assert torch.equal(block, block[:1].expand(3, -1))
    loss = model.loss(embeddings, present=batch).loss
    manual = model.objective(
        embeddings, model.logit_scale_value(), present=batch.present, groups=batch.groups
    ).loss
    assert torch.equal(loss, manual)
    loss.backward()
    assert all(p.grad is not None for p in model.towers["a"].parameters())


def test_views_configuration_errors(tmp_path):
    shards = _captioned(tmp_path)
    with pytest.raises(ConfigError, match=r"data.views.audio"):
        _load(shards, views={"audio": "sample"})
    with pytest.raises(ConfigError, match="at most one"):
        _load(shards, views={"text": "expand", "image": "expand"})
