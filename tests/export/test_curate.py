"""``mmalign prep curate``: scores against a hand computation, the FAISS near-duplicate
search against brute force, and a curated set with planted faults (swapped pairs, copies)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mmalign.cli.main import main
from mmalign.data.records import read_shard
from mmalign.export.curate import (
    decide,
    near_duplicates,
    pair_scores,
    record_scores,
    score_cut,
)
from mmalign.objectives import build_objective
from mmalign.training import train
from tests.train_support import finish, start_launch, tiny_config, write_shards


def test_pair_scores_are_mean_cosines_over_present_pairs() -> None:
    generator = torch.Generator().manual_seed(0)
    embeddings = {name: torch.randn(5, 3, generator=generator) for name in "abc"}
    present = {
        "a": torch.tensor([True, True, True, False, True]),
        "b": torch.tensor([True, True, False, False, False]),
        "c": torch.tensor([True, False, True, True, False]),
    }
    cos = {
        (p, q): torch.nn.functional.cosine_similarity(embeddings[p], embeddings[q]).numpy()
        for p, q in [("a", "b"), ("a", "c"), ("b", "c")]
    }
    expected = [
        (cos["a", "b"][0] + cos["a", "c"][0] + cos["b", "c"][0]) / 3,
        cos["a", "b"][1],
        cos["a", "c"][2],
        np.nan,  # only c
        np.nan,  # only a
    ]
    np.testing.assert_allclose(pair_scores(embeddings, present), expected, rtol=1e-5)


def test_three_modalities_take_the_objectives_own_score() -> None:
    generator = torch.Generator().manual_seed(1)
    embeddings = {
        name: torch.nn.functional.normalize(torch.randn(4, 3, generator=generator), dim=-1)
        for name in "abc"
    }
    present = {name: torch.ones(4, dtype=torch.bool) for name in "abc"}
    present["b"] = torch.tensor([True, False, True, True])
    present["c"] = torch.tensor([True, True, False, True])
    symile = build_objective({"name": "symile"})
    b = torch.where(present["b"][:, None], embeddings["b"], torch.ones(4, 3))
    product = (embeddings["a"] * b * embeddings["c"]).sum(-1).numpy()
    expected = [product[0], product[1], np.nan, product[3]]  # row 2: no candidate (c)
    np.testing.assert_allclose(record_scores(symile, embeddings, present), expected, rtol=1e-5)
    clip = build_objective({"name": "clip"})
    np.testing.assert_array_equal(
        record_scores(clip, embeddings, present), pair_scores(embeddings, present)
    )


def test_near_duplicates_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(60, 6)).astype(np.float32)
    vectors[40:50] = vectors[:10] + 1e-4 * rng.normal(size=(10, 6))  # copies of 0..9
    vectors[50:52] = vectors[45]  # copies of a copy
    candidates = np.ones(60, dtype=bool)
    candidates[5] = False  # not a candidate: its copy (45) is the first of its group
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similar = unit @ unit.T >= 0.995
    expected = np.zeros(60, dtype=bool)
    for row in range(60):
        if candidates[row] and not expected[row]:
            later = np.arange(60) > row
            expected |= similar[row] & later & candidates
    found = near_duplicates(vectors, candidates, 0.995)
    np.testing.assert_array_equal(found, expected)
    assert set(np.flatnonzero(found)) == set(range(40, 52)) - {45}


def test_cut_and_reasons() -> None:
    scores = np.array([0.9, 0.1, np.nan, 0.8, 0.85], dtype=np.float32)
    assert score_cut(scores, 0.5, None) == 0.5
    assert score_cut(scores, None, 0.5) == pytest.approx(0.85)
    vectors = np.array([[1, 0], [0, 1], [1, 1], [0.6, 0.8], [1, 0]], dtype=np.float32)
    reasons = decide(scores, vectors, 0.5, missing="drop")
    assert reasons == ["", "low_score", "missing_modality", "", "duplicate"]
    assert decide(scores, None, 0.5)[2] == ""  # missing="keep"


def _digest(paths: list[Path]) -> list[str]:
    return [hashlib.sha256(path.read_bytes()).hexdigest() for path in paths]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("curate")
    shards = write_shards(directory / "shards", "train", shards=2, per_shard=128, seed=0)
    config = tiny_config(
        directory / "run",
        shards,
        data={"resampled": True, "shuffle_buffer": 64, "batch_size": 32},
        train={"steps": 80, "log_every": 80},
    )
    train(config)
    return directory / "run"


def test_curate_removes_swapped_pairs_and_copies_and_keeps_the_originals(
    tmp_path: Path, trained: Path
) -> None:
    rng = np.random.default_rng(7)
    source = tmp_path / "source"
    write_shards(source, "fresh", shards=1, per_shard=200, seed=9)
    records = list(read_shard(str(source / "fresh-000000.tar")))
    planted = tmp_path / "planted.tar"
    swapped, copies, clean = set(), set(), set()
    with wds.TarWriter(str(planted)) as writer:
        for index, record in enumerate(records):
            record = {k: v for k, v in record.items() if k != "__url__"}
            if rng.random() < 0.15:
                record["y.npy"] = records[(index + 7) % len(records)]["y.npy"]
                swapped.add(record["__key__"])
            else:
                clean.add(record["__key__"])
            writer.write(record)
            if rng.random() < 0.05:
                copies.add(record["__key__"] + "_copy")
                writer.write({**record, "__key__": record["__key__"] + "_copy"})
    before = _digest([planted])
    out = tmp_path / "curated"

    arguments = ["curate", str(trained), "--data", str(planted), "--out", str(out)]
    status = main(["prep", *arguments, "--threshold", "0.8"])

    assert status == 0 and _digest([planted]) == before  # the original is only read
    kept = {r["__key__"]: r for path in out.glob("curated-*.tar") for r in read_shard(str(path))}
    assert len(swapped - kept.keys()) >= 0.9 * len(swapped) and len(swapped) >= 20
    assert len(copies - kept.keys()) >= 0.9 * len(copies) and len(copies) >= 5
    assert len(clean & kept.keys()) >= 0.95 * len(clean)
    originals = {r["__key__"]: r for r in read_shard(str(planted))}
    for key, record in kept.items():  # copied byte for byte
        assert {k: v for k, v in record.items() if k != "__url__"} == {
            k: v for k, v in originals[key].items() if k != "__url__"
        }
    report = json.loads((out / "curate.json").read_text())
    assert report["kept"] == len(kept)
    assert report["kept"] + sum(report["dropped"].values()) == len(originals)
    assert {e["key"] for e in report["examples"]["duplicate"]} <= copies
    assert report["cut"] == 0.8 and report["dedup"] == {"modality": "x", "threshold": 0.995}
    with Image.open(out / "scores.png") as image:
        assert image.size[0] > 400


def test_a_dedup_modality_that_is_not_scored_is_one_line(
    tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = write_shards(tmp_path, "few", shards=1, per_shard=4)
    arguments = ["curate", str(trained), "--data", shards, "--out", str(tmp_path / "out")]
    assert main(["prep", *arguments, "--dedup", "z"]) == 2
    assert capsys.readouterr().err == (
        "mmalign: error: 'z' is not one of the scored modalities ['x', 'y'] (--dedup); name one "
        "of them or pass --no-dedup\n"
    )
    assert not (tmp_path / "out").exists()


LAUNCHED = """
import sys
import torch.distributed as dist
from mmalign.cli.main import main
status = main(["prep", "curate", *sys.argv[1:]])
print(f"rank {dist.get_rank()} of {dist.get_world_size()}: status {status}")
"""


@pytest.mark.launches
def test_two_processes_curate_like_one(tmp_path: Path, trained: Path) -> None:
    shards = [str(tmp_path / f"part-{i:06d}.tar") for i in range(3)]
    write_shards(tmp_path, "part", shards=2, per_shard=24, seed=3)
    with wds.TarWriter(shards[2]) as writer:  # copies of shard 1, read after it
        for record in list(read_shard(shards[1]))[::3]:
            kept = {k: v for k, v in record.items() if k != "__url__"}
            writer.write({**kept, "__key__": record["__key__"] + "_copy"})
    script = tmp_path / "launched.py"
    script.write_text(LAUNCHED)
    options = [
        "--data",
        str(tmp_path / "part-{000000..000002}.tar"),
        "--keep-fraction",
        "0.7",
        "--maxcount",
        "20",
    ]
    log = tmp_path / "launch.log"
    process = start_launch(
        [str(script), str(trained), *options, "--out", str(tmp_path / "two")], log
    )
    assert main(["prep", "curate", str(trained), *options, "--out", str(tmp_path / "one")]) == 0
    status, output = finish(process, log)
    assert status == 0, output
    assert "rank 0 of 2: status 0" in output and "rank 1 of 2: status 0" in output
    assert output.count("records (dropped: ") == 1  # one summary line, not one per process

    def result(out: Path) -> tuple[dict, list[str]]:
        report = json.loads((out / "curate.json").read_text())
        keys = [r["__key__"] for p in sorted(out.glob("curated-*.tar")) for r in read_shard(str(p))]
        return report, keys

    (one, one_keys), (two, two_keys) = result(tmp_path / "one"), result(tmp_path / "two")
    assert two_keys == one_keys and len(one_keys) > 0
    assert {k: two[k] for k in ("kept", "dropped", "written")} == {
        k: one[k] for k in ("kept", "dropped", "written")
    }
    duplicates = [e["key"] for e in one["examples"]["duplicate"]]
    assert duplicates and all(key.endswith("_copy") for key in duplicates)  # not the originals
    assert two["cut"] == pytest.approx(one["cut"], abs=1e-6)
    for reason, shown in one["examples"].items():
        assert [e["key"] for e in two["examples"][reason]] == [e["key"] for e in shown]
