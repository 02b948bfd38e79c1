"""The WebDataset loader: decoding, skipping and counting, presence masks, splitting, seeds."""

from __future__ import annotations

import io
import itertools
import logging
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
import torch
import webdataset as wds
from PIL import Image

from mmalign.config import ConfigError, DataConfig, TowerConfig
from mmalign.data import (
    RecordError,
    decode_value,
    iterate_records,
    loader_from_config,
    make_loader,
)
from mmalign.towers import Tower

FIELDS = {"image": "png", "text": "txt", "audio": "flac", "graph": "graph.json"}


class EchoTower(Tower):
    """``preprocess`` returns the raw value (rejecting the text "REJECT"); ``collate`` a list."""

    width = 1

    def __init__(self) -> None:
        super().__init__(TowerConfig(type="echo"))

    def preprocess(self, raw: Any, augment: bool = False) -> Any:
        if isinstance(raw, str) and raw == "REJECT":
            raise ValueError("this tower rejects the text REJECT")
        return (raw, augment)

    def collate(self, items: list[Any]) -> list[Any]:
        return list(items)


def echo_towers(names: list[str] | None = None) -> dict[str, EchoTower]:
    return {name: EchoTower() for name in names or FIELDS}


def flac(seed: int) -> tuple[bytes, np.ndarray]:
    waveform = np.random.default_rng(seed).uniform(-0.5, 0.5, 800).astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, waveform, 16000, format="FLAC", subtype="PCM_16")
    data = buffer.getvalue()
    return data, soundfile.read(io.BytesIO(data), dtype="float32")[0]


def good_record(index: int) -> dict[str, Any]:
    pixels = np.full((4, 5, 3), index % 25 * 10, dtype=np.uint8)
    return {
        "__key__": f"good{index:02d}",
        "png": pixels,
        "txt": f"caption {index}",
        "flac": flac(index)[0],
        "graph.json": {"x": [[float(index)], [1.0]], "edge_index": [[0, 1], [1, 0]]},
        "cls": index,
    }


def write_shard(path: Path, records: list[dict[str, Any]]) -> str:
    with wds.TarWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    return str(path)


def truncate_last_file(path: Path) -> None:
    """Cut the shard in the middle of the data of its last file."""
    with tarfile.open(path) as archive:
        last = archive.getmembers()[-1]
    with path.open("r+b") as handle:
        handle.truncate(last.offset_data + last.size // 2)


def keys_of(loader: Any) -> list[str]:
    return [key for batch in loader for key in batch.keys]


def make_numbered_shards(directory: Path, shards: int, per_shard: int) -> list[str]:
    urls = []
    for shard in range(shards):
        records = [
            {"__key__": f"s{shard}r{row}", "txt": f"text {shard} {row}"} for row in range(per_shard)
        ]
        urls.append(write_shard(directory / f"part-{shard:06d}.tar", records))
    return urls


@pytest.fixture
def corrupt_shards(tmp_path: Path) -> tuple[list[str], list[str], dict[str, int]]:
    """Two shards: good records mixed with one broken record of every kind, the second
    shard truncated in its last record. Returns urls, good keys and expected counters."""
    bad = [
        {**good_record(90), "__key__": "bad_image", "png": b"these are not png bytes"},
        {**good_record(91), "__key__": "bad_audio", "flac": b"these are not flac bytes"},
        {**good_record(92), "__key__": "bad_json", "graph.json": b'{"x": [[1.0]'},
        {**good_record(93), "__key__": "empty_file", "txt": b""},
        {**good_record(94), "__key__": "tower_rejects", "txt": "REJECT"},
        {"__key__": "no_modality", "cls": 3},
    ]
    first = [good_record(0), bad[0], good_record(1), bad[1], bad[2], good_record(2)]
    second = [bad[3], good_record(3), bad[4], bad[5], good_record(4)]
    second.append({"__key__": "cut", "cls": 5, "txt": "x" * 4000})
    urls = [write_shard(tmp_path / "a-000000.tar", first)]
    urls.append(write_shard(tmp_path / "a-000001.tar", second))
    truncate_last_file(Path(urls[1]))
    expected = {
        "seen": 12,
        "used": 5,
        "skipped/bad_image": 1,
        "skipped/bad_audio": 1,
        "skipped/bad_json": 1,
        "skipped/empty_file": 1,
        "skipped/preprocess": 1,
        "skipped/truncated_tar": 1,
        "dropped/no_modality": 1,
    }
    return urls, [f"good{i:02d}" for i in range(5)], expected


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.launches)])
def test_corrupt_records_are_skipped_and_counted_by_reason(
    corrupt_shards: tuple, workers: int, caplog: pytest.LogCaptureFixture
) -> None:
    urls, good_keys, expected = corrupt_shards
    loader = make_loader(urls, echo_towers(), FIELDS, batch_size=2, workers=workers)
    with caplog.at_level(logging.WARNING, logger="mmalign.data"):
        keys = keys_of(loader)
    assert sorted(keys) == good_keys
    counters = loader.counters
    assert counters == expected
    skipped = sum(v for k, v in counters.items() if k.startswith(("skipped/", "dropped/")))
    assert counters["seen"] == counters["used"] + skipped
    if workers == 0:  # worker logs go to the worker's stderr, not to caplog
        messages = [record.getMessage() for record in caplog.records]
        for key, shard in [("bad_image", urls[0]), ("bad_json", urls[0]), ("cut", urls[1])]:
            assert sum(key in m and shard in m for m in messages) == 1


def test_counters_accumulate_over_epochs(corrupt_shards: tuple) -> None:
    urls, _, expected = corrupt_shards
    loader = make_loader(urls, echo_towers(), FIELDS, batch_size=4)
    keys_of(loader)
    keys_of(loader)
    assert loader.counters == {name: 2 * count for name, count in expected.items()}
    assert loader.state_dict()["epoch"] == 2


def test_decoded_values_reach_the_towers(tmp_path: Path) -> None:
    records = [good_record(index) for index in range(3)]
    url = write_shard(tmp_path / "v-000000.tar", records)
    loader = make_loader(url, echo_towers(), FIELDS, batch_size=8, label_field="cls")
    (batch,) = list(loader)
    assert batch.keys == ["good00", "good01", "good02"]
    assert batch.labels.tolist() == [0, 1, 2]
    for row, index in enumerate(range(3)):
        image, augmented = batch.inputs["image"][row]
        assert image.mode == "RGB" and not augmented
        assert np.array_equal(np.asarray(image), np.full((4, 5, 3), index * 10, np.uint8))
        assert batch.inputs["text"][row][0] == f"caption {index}"
        waveform, sample_rate = batch.inputs["audio"][row][0]
        assert sample_rate == 16000 and waveform.dtype == np.float32
        assert np.array_equal(waveform, flac(index)[1])
        graph = batch.inputs["graph"][row][0]
        assert graph["x"].dtype == np.float32 and graph["x"].tolist() == [[index], [1.0]]
        assert graph["edge_index"].dtype == np.int64 and graph["edge_index"].shape == (2, 2)


def test_presence_mask_follows_the_tower_order(tmp_path: Path) -> None:
    full = good_record(0)
    records = [
        {"__key__": "img_txt", "png": full["png"], "txt": "a"},
        {"__key__": "txt_only", "txt": "b"},
        {"__key__": "nothing", "cls": 1, "json": {"note": "no modality"}},
        {"__key__": "img_only", "png": full["png"]},
    ]
    url = write_shard(tmp_path / "p-000000.tar", records)
    towers = echo_towers(["text", "audio", "image"])
    loader = make_loader(url, towers, FIELDS, batch_size=8, metadata_fields=["json"])
    (batch,) = list(loader)
    assert batch.modalities == ["text", "audio", "image"]
    assert batch.keys == ["img_txt", "txt_only", "img_only"]
    assert batch.present.dtype == torch.bool
    assert batch.present.tolist() == [
        [True, False, True],
        [True, False, False],
        [False] * 2 + [True],
    ]
    assert [text for text, _ in batch.inputs["text"]] == ["a", "b"]
    assert len(batch.inputs["image"]) == 2
    assert batch.inputs["audio"] is None
    assert batch.metadata == {"json": [None, None, None]}
    assert batch.labels is None and batch.groups is None
    assert loader.counters == {"seen": 4, "used": 3, "dropped/no_modality": 1}


def test_alternative_extensions_and_metadata(tmp_path: Path) -> None:
    jpeg = io.BytesIO()
    Image.new("RGB", (3, 3), (200, 10, 10)).save(jpeg, format="JPEG")
    records = [
        {"__key__": "j", "jpg": jpeg.getvalue(), "json": {"id": 1}},
        {"__key__": "p", "png": np.zeros((3, 3, 3), np.uint8), "json": {"id": 2}},
    ]
    url = write_shard(tmp_path / "m-000000.tar", records)
    loader = make_loader(
        url, echo_towers(["image"]), {"image": "jpg;png"}, 4, metadata_fields=["json"]
    )
    (batch,) = list(loader)
    assert batch.present.all()
    assert batch.metadata["json"] == [{"id": 1}, {"id": 2}]
    assert np.asarray(batch.inputs["image"][0][0])[1, 1, 0] > 150


@pytest.mark.launches
@pytest.mark.parametrize("shards", [6, 5, 3, 1])
def test_ranks_and_workers_read_disjoint_parts_covering_everything(
    tmp_path: Path, shards: int
) -> None:
    per_shard = 24 // shards
    urls = make_numbered_shards(tmp_path, shards, per_shard)
    everything = {f"s{s}r{r}" for s in range(shards) for r in range(per_shard)}
    parts = []
    for rank in range(2):
        loader = make_loader(
            urls,
            echo_towers(["text"]),
            FIELDS,
            3,
            workers=2,
            rank=rank,
            world_size=2,
            seed=1,
            shuffle_buffer=4,
        )
        parts.append(keys_of(loader))
    assert set(parts[0]).isdisjoint(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(everything)
    assert len(parts[0]) + len(parts[1]) == len(everything)


def test_order_is_deterministic_for_a_seed_and_changes_with_seed_and_epoch(tmp_path: Path) -> None:
    urls = make_numbered_shards(tmp_path, 4, 10)

    def loader(seed: int) -> Any:
        return make_loader(urls, echo_towers(["text"]), FIELDS, 5, shuffle_buffer=8, seed=seed)

    first, again, other = loader(7), loader(7), loader(8)
    epoch0 = keys_of(first)
    assert epoch0 == keys_of(again)
    assert epoch0 != keys_of(other) and sorted(epoch0) == sorted(keys_of(loader(8)))
    epoch1 = keys_of(first)
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)
    unshuffled = make_loader(urls, echo_towers(["text"]), FIELDS, 5)
    assert keys_of(unshuffled) == [f"s{s}r{r}" for s in range(4) for r in range(10)]


@pytest.mark.launches
def test_resampled_streams_are_seeded_infinite_and_bounded_by_epoch_samples(
    tmp_path: Path,
) -> None:
    urls = make_numbered_shards(tmp_path, 3, 5)

    def loader(seed: int, **options: Any) -> Any:
        return make_loader(
            urls, echo_towers(["text"]), FIELDS, 4, resampled=True, seed=seed, **options
        )

    bounded = loader(5, epoch_samples=23, workers=2, rank=1, world_size=2, shuffle_buffer=4)
    keys = keys_of(bounded)
    assert len(keys) == 23 and bounded.counters["used"] == 23
    assert keys == keys_of(
        loader(5, epoch_samples=23, workers=2, rank=1, world_size=2, shuffle_buffer=4)
    )
    assert keys != keys_of(
        loader(6, epoch_samples=23, workers=2, rank=1, world_size=2, shuffle_buffer=4)
    )
    endless = itertools.islice(iter(loader(5)), 20)  # 80 samples from 15 records
    drawn = [key for batch in endless for key in batch.keys]
    assert len(drawn) == 80 and len(set(drawn)) <= 15


@pytest.mark.launches
def test_augment_is_applied_in_the_loader_only(tmp_path: Path) -> None:
    url = write_shard(tmp_path / "g-000000.tar", [good_record(i) for i in range(4)])
    towers = echo_towers(["text"])
    for workers in (0, 2):
        loader = make_loader(url, towers, FIELDS, 2, workers=workers, augment=True)
        flags = [augmented for batch in loader for _, augmented in batch.inputs["text"]]
        assert flags == [True] * 4


@pytest.mark.launches
def test_shard_specs_directory_list_braces_and_pipe_urls(tmp_path: Path) -> None:
    urls = make_numbered_shards(tmp_path, 3, 2)
    expected = [f"s{s}r{r}" for s in range(3) for r in range(2)]
    towers = echo_towers(["text"])
    specs = [
        str(tmp_path),
        urls,
        str(tmp_path / "part-{000000..000002}.tar"),
        f"pipe:cat {tmp_path}/part-{{000000..000002}}.tar",
    ]
    for spec in specs:
        assert keys_of(make_loader(spec, towers, FIELDS, 4)) == expected


def test_missing_shards_name_the_pattern_and_the_config_field(tmp_path: Path) -> None:
    pattern = str(tmp_path / "train-{000000..000003}.tar")
    with pytest.raises(FileNotFoundError, match=r"data\.train: 4 of 4 shards .*train-\{000000"):
        make_loader(pattern, echo_towers(["text"]), FIELDS, 4, field="data.train")
    config = DataConfig(train=pattern, fields={"text": "txt"})
    with pytest.raises(ConfigError, match=r"data\.val is not set"):
        loader_from_config(config, echo_towers(["text"]), "val")
    with pytest.raises(ConfigError, match=r"data\.fields\.audio"):
        make_loader(pattern, echo_towers(["audio"]), {"text": "txt"}, 4)


def test_loader_from_config_reads_validation_in_order(tmp_path: Path) -> None:
    records = [good_record(i) for i in range(5)]
    url = write_shard(tmp_path / "val-000000.tar", records)
    config = DataConfig(train=url, val=url, fields=FIELDS, batch_size=2, shuffle_buffer=100)
    val = loader_from_config(config, echo_towers(), "val")
    batches = list(val)
    assert [b.keys for b in batches] == [["good00", "good01"], ["good02", "good03"], ["good04"]]
    assert torch.cat([b.labels for b in batches]).tolist() == [0, 1, 2, 3, 4]
    assert not any(flag for b in batches for _, flag in b.inputs["text"])
    train = loader_from_config(
        config.model_copy(update={"epoch_samples": 4}), echo_towers(), "train"
    )
    train_batches = list(train)
    assert all(len(b.keys) == 2 for b in train_batches) and len(train_batches) == 2
    assert all(flag for b in train_batches for _, flag in b.inputs["text"])


def test_iterate_records_gives_raw_values_and_skips_bad_ones(corrupt_shards: tuple) -> None:
    urls, good_keys, _ = corrupt_shards
    records = list(iterate_records(urls, {"image": "png", "label": "cls"}))
    by_key = {record["__key__"]: record for record in records}
    assert "bad_image" not in by_key and "cut" not in by_key
    assert by_key["no_modality"] == {"__key__": "no_modality", "__url__": urls[1], "label": 3}
    for index, key in enumerate(good_keys):
        assert by_key[key]["label"] == index
        assert np.asarray(by_key[key]["image"]).max() == index * 10


@pytest.mark.parametrize(
    ("extension", "data", "reason"),
    [
        ("png", b"\x89PNG not really", "bad_image"),
        ("flac", b"fLaC nope", "bad_audio"),
        ("json", b"{", "bad_json"),
        ("graph.json", b"[1, 2]", "bad_graph"),
        ("graph.json", b'{"x": [[0.0]], "edge_index": [[0], [3]]}', "bad_graph"),
        ("cls", b"seven", "bad_label"),
        ("npy", b"\x93NUMPY broken", "bad_array"),
        ("txt", b"\xff\xfe\xfa", "bad_text"),
        ("txt", b"", "empty_file"),
    ],
)
def test_decode_failures_carry_their_reason(extension: str, data: bytes, reason: str) -> None:
    with pytest.raises(RecordError) as caught:
        decode_value(extension, data)
    assert caught.value.reason == reason


def test_decode_values() -> None:
    stereo = io.BytesIO()
    soundfile.write(stereo, np.zeros((100, 2), np.float32), 8000, format="WAV")
    waveform, rate = decode_value("wav", stereo.getvalue())
    assert waveform.shape == (2, 100) and rate == 8000
    array = io.BytesIO()
    np.save(array, np.arange(3.0))
    assert decode_value("npy", array.getvalue()).tolist() == [0.0, 1.0, 2.0]
    graph = io.BytesIO()
    np.savez(graph, x=np.ones((2, 3)), edge_index=np.array([[0], [1]]), edge_attr=np.ones((1, 2)))
    decoded = decode_value("npz", graph.getvalue())
    assert decoded["edge_attr"].shape == (1, 2) and decoded["x"].dtype == np.float32
    assert decode_value("json", b'{"a": [1]}') == {"a": [1]}
    assert decode_value("cls", b" 4\n") == 4
    assert decode_value("bin", b"\x00\x01") == b"\x00\x01"


def test_rank_and_world_size_default_to_torch_distributed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = make_numbered_shards(tmp_path, 4, 3)
    towers = echo_towers(["text"])
    loader = make_loader(urls, towers, FIELDS, 4)  # built before the process group exists
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    assert keys_of(loader) == [f"s{s}r{r}" for s in (1, 3) for r in range(3)]
    explicit = make_loader(urls, towers, FIELDS, 4, rank=0, world_size=2)
    assert keys_of(explicit) == [f"s{s}r{r}" for s in (0, 2) for r in range(3)]
    with pytest.raises(ValueError, match="rank 2 is not in"):
        make_loader(urls, towers, FIELDS, 4, rank=2, world_size=2)
