"""Index and search parameters are range-checked before FAISS sees them: ``--m 0`` (FAISS
aborts the process), ``--nprobe -1`` (stored, then breaking every search), ``--ef-search 0``
(fewer rows than ``--k``), a NaN query weight, ``--maxcount 0``; each is one line naming the
flag, and a beam narrower than ``k`` still returns ``k`` rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import fork_mmalign, tabular_vector
from tiny_run import exported, trained_run

from mmalign.cli.main import main
from mmalign.errors import ConfigError, UserError
from mmalign.export import build_index, load_index, search
from mmalign.prep.group_shards import group_shards

pytestmark = pytest.mark.launches  # forks the test process (a FAISS abort would end it)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    directory = tmp_path_factory.mktemp("index")
    run, shards = trained_run(directory)
    return run, exported(run, shards, directory / "emb"), shards


def test_hnsw_m_0_is_one_line_not_an_abort(
    tmp_path: Path, export: tuple[Path, Path, str], capfd: pytest.CaptureFixture[str]
) -> None:
    run, _, shards = export
    out = tmp_path / "emb"
    command = ["export", str(run), "--data", shards, "--out", str(out), "--no-progress"]
    assert fork_mmalign([*command, "--index", "hnsw", "--m", "0"]) == 2
    error = capfd.readouterr().err.strip().splitlines()
    assert error == [
        "mmalign: error: index parameter m must be an integer between 2 and 256, got 0 (--m); "
        "pass a value in range"
    ]
    assert not out.exists()  # refused before the export
    for flag in ("--nprobe", "--ef-search", "--nlist", "--pq-m"):
        with pytest.raises(SystemExit) as exited:
            main([*command, "--index", "ivf", flag, "-1"])
        assert exited.value.code == 2
        said = f"mmalign: error: '-1' is not a whole number >= 1 ({flag}); see mmalign export"
        assert capfd.readouterr().err.startswith(said)


def test_bad_parameters_are_refused_at_build_and_at_load(export: tuple[Path, Path, str]) -> None:
    _, out, _ = export
    for options, field in (
        ({"nprobe": -1}, "nprobe"),
        ({"ef_search": 0}, "ef_search"),
        ({"m": 1}, "m"),
        ({"m": 2**31 - 1}, "m"),  # a C++ length error in FAISS
        ({"ef_search": 99999999999}, "ef_search"),  # stored, then overflowing every search
        ({"nlist": 0}, "nlist"),
        ({"pq_bits": 17}, "pq_bits"),
    ):
        with pytest.raises(ConfigError, match=f"index parameter {field} must be an integer"):
            build_index(out, "labs", "ivf", **options)
    path = build_index(out, "labs", "ivf", nlist=1)
    info = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**info, "nprobe": -1}))  # planted
    with pytest.raises(ConfigError, match=r"nprobe .*got -1 \(--nprobe; stored in .*labs\.json"):
        load_index(out, "labs")
    path.with_suffix(".json").write_text(json.dumps(info))


def test_a_narrow_beam_still_returns_k_rows(export: tuple[Path, Path, str]) -> None:
    _, out, _ = export
    build_index(out, "labs", "hnsw", ef_search=1)
    index = load_index(out, "labs")
    rows = index.search(np.ones((1, index.info["dim"]), dtype=np.float32), k=5)
    assert [len(found) for found in rows] == [5]
    assert index.index.hnsw.efSearch >= 5


def test_a_k_beyond_the_rows_returns_every_row_and_a_huge_k_is_refused(
    export: tuple[Path, Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``--k 10000000000`` on an HNSW index was a beam wider than a C int (an OverflowError
    traceback): ``k`` is cut to the rows, and the command line bounds ``--k``."""
    _, out, _ = export
    build_index(out, "labs", "hnsw")
    index = load_index(out, "labs")
    rows = index.search(np.ones((1, index.info["dim"]), dtype=np.float32), k=10**10)
    assert [len(found) for found in rows] == [index.info["rows"]]
    assert index.index.hnsw.efSearch == max(index.info["ef_search"], index.info["rows"])
    query = f"labs={json.dumps(tabular_vector(1).tolist())}"
    for k in ("10000000000", str(2**24 + 1)):
        with pytest.raises(SystemExit) as exited:
            main(["search", str(out), "--target", "labs", "--query", query, "--k", k])
        assert exited.value.code == 2
        assert capsys.readouterr().err.splitlines() == [
            f"mmalign: error: {k!r} is not a whole number in [1, 16777216] (--k); see mmalign "
            "search --help"
        ]


def test_nan_weight_and_zero_maxcount_are_refused(
    tmp_path: Path, export: tuple[Path, Path, str]
) -> None:
    run, out, _ = export
    build_index(out, "labs", "flat")
    query = {"labs": tabular_vector(1).tolist(), "graph": {"x": [[0.0, 1.0]], "edge_index": []}}
    for weight in (math.nan, math.inf):
        with pytest.raises(UserError, match=r"query weights must be finite .*\(--weights\)"):
            search(out, run, query, target="labs", weights={"labs": weight, "graph": 1.0})
    with pytest.raises(UserError, match=r"records per shard must be >= 1 \(--maxcount\)"):
        group_shards(out, "labs", clusters=2, out=tmp_path / "grouped", maxcount=0)
    assert not (tmp_path / "grouped").exists()


@pytest.mark.parametrize("tool", ["from-manifest", "curate", "group-shards", "mine-negatives"])
def test_every_prep_tool_refuses_zero_maxcount(
    tool: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--maxcount 0`` would write empty shards: refused by the argument, before any work."""
    required = {
        "from-manifest": ["manifest.csv"],
        "curate": ["model", "--data", "x.tar"],
        "group-shards": ["--embeddings", "emb", "--modality", "labs"],
        "mine-negatives": ["--embeddings", "emb", "--modality", "labs"],
    }[tool]
    argv = ["prep", tool, *required, "--out", str(tmp_path / "out"), "--maxcount", "0"]
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("mmalign: error:") and "(--maxcount)" in error, error
    assert len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists()
