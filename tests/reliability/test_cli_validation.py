"""Wrong inputs to search, export, eval and convert end in one line naming the flag (status 2,
no traceback): a query the model's tower refuses, a model that did not make the export, a
``--dim`` beyond the model's, an ``--out`` that is a file or the working directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import tiny_config, write_shards

from mmalign.cli.main import main
from mmalign.config import ConfigError
from mmalign.training import train


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two tiny runs of the same config with different seeds, and an indexed export of the
    first."""
    root = tmp_path_factory.mktemp("cli")
    shards = write_shards(root / "shards")
    runs = {}
    for name, seed in (("run", 0), ("other", 1)):
        config = tiny_config(root / name, shards, train={"steps": 2, "seed": seed})
        runs[name] = str(train(config).output_dir)
    emb = str(root / "emb")
    arguments = ["export", runs["run"], "--data", shards, "--out", emb, "--index", "flat"]
    assert main([*arguments, "--no-progress"]) == 0
    return {**runs, "emb": emb, "shards": shards, "root": str(root)}


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    error = capsys.readouterr().err
    assert error.startswith("mmalign: error: ") and error.count("\n") == 1, error
    return error


def search(workspace: dict[str, str], *arguments: str) -> list[str]:
    return ["search", workspace["emb"], "--target", "labs", "--k", "3", *arguments]


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("labs=[1, 2, 3]", "length 6 (in_features), got shape (3,)"),
        ('labs=["a", 2, 3, 4, 5, 6]', "entries must be numbers"),
        ("labs=[[1, 2], [3]]", "must be a flat list of numbers"),
        ('labs={"a": 1}', "entries must be numbers"),
    ],
    ids=["short vector", "a string entry", "ragged", "a mapping"],
)
def test_a_query_the_tower_refuses_names_the_query(
    workspace: dict[str, str], query: str, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(search(workspace, "--query", query)) == 2
    error = one_line_error(capsys)
    assert "the labs query cannot be used" in error and named in error
    assert "(--query labs=...)" in error


def test_a_graph_query_the_tower_refuses(
    workspace: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    graph = tmp_path / "graph.json"
    graph.write_text('{"x": [[1, 2]], "edge_index": [[0], [5]]}')
    assert main(search(workspace, "--query", f"graph={graph}")) == 2
    assert "refers to node 5" in one_line_error(capsys)


def test_search_refuses_a_model_that_did_not_make_the_export(
    workspace: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    query = ["--query", "labs=[1, 2, 3, 4, 5, 6]"]
    assert main(search(workspace, *query, "--model", workspace["other"])) == 2
    error = one_line_error(capsys)
    assert "is not the one that made the export" in error and "(--model)" in error
    assert main(search(workspace, *query, "--model", workspace["run"])) == 0
    assert "sample" in capsys.readouterr().out


def test_export_dim_beyond_the_model_names_the_flag(
    workspace: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = Path(workspace["root"]) / "wide"
    arguments = ["export", workspace["run"], "--data", workspace["shards"], "--out", str(out)]
    assert main([*arguments, "--dim", "100", "--no-progress"]) == 2
    error = one_line_error(capsys)
    assert "dim 100 is outside 1..8, the model's dim (--dim)" in error


@pytest.mark.parametrize("command", ["export", "convert"])
def test_out_that_is_a_file_or_the_working_directory(
    workspace: dict[str, str],
    tmp_path: Path,
    command: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    given = {
        "export": ["export", workspace["run"], "--data", workspace["shards"], "--no-progress"],
        "convert": ["convert", workspace["run"], "--to", "onnx", "--modality", "labs"],
    }[command]
    for out, named in (
        ("notes.txt", "'notes.txt' is a file, not a directory"),
        (".", "'.' is the working directory or above it"),
        ("..", "'..' is the working directory or above it"),
        ("x" * 300, "cannot be used: File name too long"),
    ):
        with pytest.raises(SystemExit) as exited:
            main([*given, "--out", out])
        assert exited.value.code == 2
        error = one_line_error(capsys)
        assert named in error and "(--out)" in error
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_glob_matching_nothing_is_named(
    workspace: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    pattern = str(Path(workspace["root"]) / "shards" / "nothing-*.tar")
    assert main(["eval", workspace["run"], "--data", pattern]) == 2
    error = one_line_error(capsys)
    assert f"the glob '{pattern}' matches no file" in error and "a file does not exist" not in error


@pytest.mark.parametrize("tool", ["group-shards", "mine-negatives"])
def test_prep_tools_name_a_modality_the_export_lacks(
    workspace: dict[str, str], tmp_path: Path, tool: str, capsys: pytest.CaptureFixture[str]
) -> None:
    given = {
        "group-shards": ["--modality", "audio", "--clusters", "2"],
        "mine-negatives": ["--query", "labs", "--candidates", "audio"],
    }[tool]
    out = str(tmp_path / "out")
    assert main(["prep", tool, "--embeddings", workspace["emb"], *given, "--out", out]) == 2
    error = one_line_error(capsys)
    assert "has no 'audio' embeddings" in error and "exported: labs, graph" in error


@pytest.mark.parametrize("command", ["export", "eval"])
def test_a_field_no_record_has_names_the_flag_and_the_fields(
    workspace: dict[str, str], tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "out")
    arguments = [command, workspace["run"], "--data", workspace["shards"], "--out", out]
    assert main([*arguments, "--field", "labs=zzz"]) == 2
    error = one_line_error(capsys)
    assert "no record of the 3 shards has the labs field 'zzz' (--field labs=zzz)" in error
    assert "give one of the records' fields: cls, graph.json, npy" in error
    assert not os.path.exists(out)


def test_a_metadata_field_no_record_has_names_the_flag(
    workspace: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: ``export --metadata nope`` wrote a column of nulls without a word."""
    out = str(tmp_path / "out")
    arguments = ["export", workspace["run"], "--data", workspace["shards"], "--out", out]
    assert main([*arguments, "--metadata", "cls,nope"]) == 2
    error = one_line_error(capsys)
    assert "no record of the 3 shards has the nope field 'nope' (--metadata nope)" in error
    assert "give one of the records' fields: cls, graph.json, npy" in error
    assert not os.path.exists(out)


@pytest.mark.parametrize(
    ("damage", "named"),
    [(b"\xff\xfe binary", "is not UTF-8 text"), (b"data: {}\ndata: {}\n", "key 'data' appears")],
    ids=["binary", "duplicate key"],
)
def test_a_damaged_run_config_names_the_file(
    workspace: dict[str, str],
    tmp_path: Path,
    damage: bytes,
    named: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mmalign.training.resume import read_run_config

    run = tmp_path / "run"
    shutil.copytree(workspace["run"], run)
    (run / "config.yaml").write_bytes(damage)
    assert main(["eval", str(run), "--data", workspace["shards"]]) == 2
    error = one_line_error(capsys)
    assert f"the run's config {run / 'config.yaml'}" in error and named in error
    with pytest.raises(ConfigError, match=named):
        read_run_config(run / "config.yaml")


def test_a_weight_for_an_unknown_modality_names_weights(
    workspace: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    query = ["--query", "labs=[1, 2, 3, 4, 5, 6]", "--weights", "nope=1"]
    assert main(search(workspace, *query)) == 2
    error = one_line_error(capsys)
    assert "no modality or tower type 'nope' (--weights)" in error


@pytest.mark.parametrize("query", ["labs=[1, 2, nan]", "labs=values.npy"])
def test_a_tabular_query_that_is_not_json_names_the_query(
    workspace: dict[str, str], query: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(search(workspace, "--query", query)) == 2
    error = one_line_error(capsys)
    assert "is not a JSON list of numbers" in error and "(--query labs=...)" in error


@pytest.mark.parametrize(
    ("name", "content", "named"),
    [
        ("rows.csv", b"\xff\xfe\x00key,x\n", "is not UTF-8 text (byte 0) (MANIFEST)"),
        ("rows.jsonl", b"[1, 2]\n", "not a JSON object: a list"),
    ],
    ids=["binary csv", "a jsonl line that is a list"],
)
def test_a_manifest_prep_cannot_read_names_the_file(
    tmp_path: Path, name: str, content: bytes, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / name
    manifest.write_bytes(content)
    out = tmp_path / "out"
    assert main(["prep", "from-manifest", str(manifest), "--out", str(out)]) == 2
    error = one_line_error(capsys)
    assert named in error and str(manifest) in error
    assert not out.exists()


def test_a_probe_modality_the_model_lacks_names_probe_modality(
    workspace: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards, out = workspace["shards"], str(tmp_path / "eval")
    arguments = ["eval", workspace["run"], "--data", shards, "--out", out, "--modalities", "labs"]
    assert main([*arguments, "--linear-probe", "--probe-train", shards]) == 2
    error = one_line_error(capsys)
    assert "unknown modality 'image' (--probe-modality)" in error
