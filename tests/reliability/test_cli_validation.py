"""Wrong inputs to search, export, eval and convert end in one line naming the flag (status 2,
no traceback): a query the model's tower refuses, a model that did not make the export, a
``--dim`` beyond the model's, an ``--out`` that is a file or the working directory."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import graph_of, tabular_vector, tiny_config, write_shards

from mmalign.cli.main import build_parser, main
from mmalign.config import ConfigError, load_config
from mmalign.export import search as search_index
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
    error = one_line_error(capsys)
    assert f"the 'graph' query {graph} is refused (bad_graph)" in error
    assert "'edge_index' refers to nodes outside 0..0" in error


def test_a_graph_query_file_goes_through_the_record_limits(
    workspace: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A graph ``.json`` query was read and parsed whole, whatever its size (a 2 GB file: as
    much memory and more); it is decoded as a record's ``graph.json``: its size against
    ``data.max_member_bytes`` first, then the record checks."""
    huge = tmp_path / "huge.json"
    with huge.open("wb") as handle:  # sparse: 100 MiB claimed, nothing to read
        handle.truncate(100 * 2**20)
    assert main(search(workspace, "--query", f"graph={huge}")) == 2
    error = one_line_error(capsys)
    assert "is refused (member_too_large)" in error and "over data.max_member_bytes" in error
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert main(search(workspace, "--query", f"graph={broken}")) == 2
    assert "is refused (bad_json)" in one_line_error(capsys)


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
    assert "the run's config " in error and f"({run / 'config.yaml'}); " in error
    assert named in error
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
    assert main([*arguments, "--few-shot", "1"]) == 2
    assert "a probe needs labelled train shards (--probe-train)" in one_line_error(capsys)
    assert not os.path.exists(out)  # refused before the evaluation, not after it


@pytest.mark.parametrize(
    ("command", "flag", "value", "named"),
    [
        ("export", "--keep-items", "nope", "unknown modality 'nope' (--keep-items)"),
        ("export", "--modalities", "labs,graph,labs", "'labs' is named twice (--modalities)"),
        ("eval", "--modalities", "labs,labs", "'labs' is named twice (--modalities)"),
    ],
)
def test_modality_lists_are_checked_before_any_work(
    workspace: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    flag: str,
    value: str,
    named: str,
) -> None:
    """Before: ``export --keep-items nope`` exported everything, then a ValueError traceback;
    ``eval --modalities labs,labs`` a RuntimeError traceback from the retrieval."""
    out = str(tmp_path / "out")
    arguments = [command, workspace["run"], "--data", workspace["shards"], "--out", out]
    assert main([*arguments, flag, value]) == 2
    assert named in one_line_error(capsys)
    assert not os.path.exists(out)


USAGE_FORM = re.compile(r"mmalign: error: [^\n]*[^ ] \((?P<where>[^()]+)\); [^\n]*[^ ]\n")
"""The rule's one line: ``mmalign: error: <what> (<where>); <what to do>``."""
BAD_VALUES = ("zzz", "0", "-1", ".", "nan", "inf", "1e999", "=x", "a=", "2.5")
"""Values tried on every flag that takes one (``--flag=VALUE``, so ``-1`` is a value)."""


def _leaf_parsers(
    parser: argparse.ArgumentParser, words: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command's words and parser, ``prep``'s tools included."""
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not found:
        yield words, parser
        return
    for name, child in found[0].choices.items():
        yield from _leaf_parsers(child, (*words, name))


def _usage_error(argv: list[str]) -> str | None:
    """What parsing ``argv`` prints on stderr when it exits, ``None`` when it parses."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(argv)
        except SystemExit:
            return err.getvalue()
    return None


def _assert_form(error: str, where: str) -> None:
    found = USAGE_FORM.fullmatch(error)
    assert found and where in found["where"], error


def test_every_flag_given_a_bad_value_gets_the_one_line_form() -> None:
    """Each subcommand's flags with each bad value: a refusal is one line naming the flag in
    parentheses, then what to do; a flag given no value, an unknown flag and missing required
    arguments too. The refusals are counted, so a flag that stops checking shows."""
    refused = 0
    for words, parser in _leaf_parsers(build_parser()):
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0 or action.help == argparse.SUPPRESS:
                continue
            flag = action.option_strings[-1]
            for value in BAD_VALUES:
                error = _usage_error([*words, f"{flag}={value}"])
                if error and "required" not in error:
                    _assert_form(error, flag)
                    refused += 1
            _assert_form(_usage_error([*words, flag]) or "", flag)
        _assert_form(_usage_error([*words, "--nope=1"]) or "", "")
        if words != ("demo",):
            _assert_form(_usage_error(list(words)) or "", "")
    assert refused >= 540, refused


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["serve", "e", "--port", "70000"], "'70000' is not a whole number in [0, 65535] (--port)"),
        (["serve", "e", "--max-wait-ms=-1"], "'-1' is not a number >= 0 (--max-wait-ms)"),
        (["export", "m", "--workers=-1"], "'-1' is not a whole number >= 0 (--workers)"),
        (["prep", "from-manifest", "m", "--maxsize", "nan"], "'nan' is not a number > 0"),
        (["prep", "curate", "m", "--dedup-threshold", "2"], "'2' is not a number in [-1, 1]"),
        (["prep", "mine-negatives", "--max-ratio", "0"], "'0' is not a number in (0, 1]"),
        (["prep", "group-shards", "--seed=-1"], "'-1' is not a whole number >= 0 (--seed)"),
        (["prep", "train-tokenizer", "--character-coverage", "1.5"], "(--character-coverage)"),
        (["eval", "m", "--few-shot", "1,x"], "'x' is not a whole number >= 1 (--few-shot)"),
        (["convert", "m", "--to", "tflite"], "invalid choice 'tflite' (--to); choose from"),
        (["export", "m", "--out", "."], "working directory or above it (--out); name a new"),
        (["trian"], "invalid choice 'trian' (COMMAND); choose from 'train'"),
        (["export", "m", "--field", "labs="], "'labs=' has an empty extension (--field)"),
        (["eval", "m", "--field", "labs=;;"], "'labs=;;' has an empty extension (--field)"),
        (["prep", "curate", "m", "--field", "labs="], "'labs=' has an empty extension"),
        (["zeroshot", "m", "--field", "labs=npy;"], "'labs=npy;' has an empty extension"),
    ],
)
def test_values_in_range_are_checked_when_parsed(argv: list[str], named: str) -> None:
    """Numbers out of their range were taken before (a negative port, NaN shard size, a
    negative worker count or seed) and failed later, some with a traceback."""
    error = _usage_error(argv)
    assert error is not None and named in error, error
    _assert_form(error, "-" if argv[0] != "trian" else "COMMAND")


@pytest.mark.parametrize("extensions", ["", ";;", "npy;"])
def test_a_config_field_with_an_empty_extension_names_the_field(extensions: str) -> None:
    """``data.fields.labs: ''`` passed the config and was a ValueError traceback once the
    loader read it: the config, ``--field`` and the loader share one rule."""
    config = tiny_config(Path("run"), "shards", data={"fields": {"labs": extensions}})
    with pytest.raises(ConfigError, match=r"data\.fields\.labs: extension list .* empty entry"):
        load_config(config)


def test_negative_weights_are_query_arithmetic(
    workspace: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``--weights labs=-1`` is legitimate (exit 0): a composed query of a pairwise model
    scores ``sum_m w_m <e_m, c>``, so every candidate's score is the weighted sum of its
    one-modality scores, and a lone negative weight reverses the ranking. All weights 0 would
    score every candidate 0: refused in one line naming ``--weights``."""
    queries = {"labs": tabular_vector(3).tolist(), "graph": graph_of(5)}
    rows = 48  # every indexed row, so each search scores all of them

    def scores(query: dict[str, object], weights: dict[str, float] | None) -> dict[str, float]:
        found = search_index(workspace["emb"], None, query, k=rows, target="labs", weights=weights)
        assert len(found) == rows
        return {row["key"]: row["score"] for row in found}

    labs = scores({"labs": queries["labs"]}, None)
    graph = scores({"graph": queries["graph"]}, None)
    mixed = scores(queries, {"labs": -1.0, "graph": 0.5})
    for key, score in mixed.items():
        assert score == pytest.approx(-labs[key] + 0.5 * graph[key], abs=1e-5)
    arguments = ["--query", "labs=" + json.dumps(queries["labs"]), "--k", str(rows)]
    assert main([*search(workspace, *arguments), "--weights", "labs=-1", "--json"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["key"] for row in printed] == sorted(labs, key=lambda key: labs[key])
    assert [row["score"] for row in printed] == pytest.approx(
        sorted(-s for s in labs.values())[::-1], abs=1e-5
    )
    assert main([*search(workspace, *arguments), "--weights", "labs=0"]) == 2
    assert "every query weight is 0" in one_line_error(capsys)


def test_serve_refuses_a_model_that_did_not_make_the_export(workspace: dict[str, str]) -> None:
    """``mmalign serve EXPORT --model OTHER`` started and answered every query with another
    model's vectors against the export's rows; it is refused before the server starts, as
    ``search --model`` is, and the exporting model is served."""
    from mmalign.export.search import QueryError
    from mmalign.serve.catalog import load_catalog

    with pytest.raises(QueryError, match=r"not the one that made the export .*\(--model\)"):
        load_catalog([workspace["emb"]], workspace["other"])
    assert list(load_catalog([workspace["emb"]], workspace["run"]).exports) == ["emb"]


@pytest.mark.parametrize("value", ["1e308", "1.5", "-2"])
def test_a_curate_threshold_outside_the_cosines_is_refused(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``prep curate --threshold 1e308`` kept nothing and printed numpy's overflow and
    matplotlib's layout warnings: a score is a cosine, so the cut is one too."""
    with pytest.raises(SystemExit) as exited:
        main(["prep", "curate", "run", "--data", "x.tar", "--out", "o", "--threshold", value])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"mmalign: error: '{value}' is not a number in [-1"), error
    assert error.count("\n") == 0 and "(--threshold)" in error
