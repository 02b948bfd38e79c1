"""The ``mmalign`` command line: train with overrides, clean errors, prep forwarding, search
query parsing, and a parser that imports nothing heavy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import mmalign.demo.data
import mmalign.training
from mmalign.cli.main import SUBCOMMANDS, main, one_line
from mmalign.cli.prep import TOOLS
from mmalign.cli.search import parse_raw, resolve_query_modality
from mmalign.config import ModelConfig
from mmalign.errors import ConfigError, UserError
from mmalign.training import TrainingStopped
from tests.train_support import tiny_config, write_shards

HEAVY = ["torch", "numpy", "pydantic", "yaml", "transformers", "open_clip", "accelerate", "faiss"]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cli")
    pattern = write_shards(directory / "data", "train", shards=1, per_shard=16)
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(directory / "unused", pattern)))
    return path


def test_train_runs_with_set_overrides(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    status = main(
        ["train", str(config_file), "--set", "train.steps=3", "--set", f"train.output={out}"]
    )
    assert status == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["steps"] == 3 and saved["train"]["output"] == str(out)
    assert json.loads((out / "run.json").read_text())["total_steps"] == 3
    assert (out / "model" / "model.safetensors").is_file()
    assert f"trained 3 steps on 1 process(es); model: {out / 'model'}" in capsys.readouterr().out


def test_errors_are_one_message_with_a_status(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture
) -> None:
    status = main(["train", str(config_file), "--set", "data.batch_size=lots"])
    assert status == 2
    assert "data.batch_size: Input should be a valid integer" in capsys.readouterr().err
    out = tmp_path / "run"
    assert (
        main(["train", str(config_file), "--set", "train.steps=1", "--set", f"train.output={out}"])
        == 0
    )
    assert (
        main(["train", str(config_file), "--set", "train.steps=1", "--set", f"train.output={out}"])
        == 2
    )
    assert "pass --resume" in capsys.readouterr().err


def test_prep_forwards_arguments_to_the_tool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    monkeypatch.setattr(mmalign.demo.data, "make_demo", lambda out, **kw: calls.append((out, kw)))
    assert main(["prep", "make-demo", "--out", str(tmp_path), "--limit", "10"]) == 0
    assert calls == [
        (tmp_path, {"seed": 0, "variants": 4, "limit": 10, "force": False, "progress": True})
    ]
    with pytest.raises(SystemExit) as exited:
        main(["prep", "no-such-tool"])
    assert exited.value.code == 2


@pytest.mark.launches
def test_help_imports_nothing_heavy() -> None:
    """``mmalign --help``, ``mmalign SUB --help`` and ``mmalign prep TOOL --help`` load only
    mmalign.cli and mmalign.errors."""
    helps = [["--help"]] + [[name, "--help"] for name in sorted(SUBCOMMANDS)]
    helps += [["prep", tool, "--help"] for tool in sorted(TOOLS)]
    script = f"""
import contextlib, io, json, sys
from mmalign.cli.main import build_parser, main
build_parser()
for argv in {helps!r}:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as exited:
            assert exited.code == 0, (argv, exited.code)
print(json.dumps(sorted(sys.modules)))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    modules = json.loads(done.stdout)
    assert [m for m in modules if m.split(".")[0] in HEAVY] == []
    allowed = {"mmalign.errors", "mmalign.cli", "mmalign.cli.main", "mmalign.cli.common"}
    allowed.add("mmalign.cli.file_system_errors")
    allowed |= {f"mmalign.cli.{name}" for name in SUBCOMMANDS}
    allowed |= {f"mmalign.cli.prep.{tool.replace('-', '_')}" for tool in TOOLS}
    assert {m for m in modules if m.startswith("mmalign.")} <= allowed


def test_config_error_is_one_line_before_the_run_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    config = {
        "model": {
            "towers": {
                "a": {"type": "tabular", "in_features": 2},
                "b": {"type": "tabular", "in_features": 2},
            },
            "objective": {"name": "anchored", "anchor": "nope"},
        },
        "data": {"train": str(tmp_path / "nowhere-{000000..000001}.tar")},
        "train": {"output": str(out)},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmalign: error: ")
    assert "model.objective.anchor" in lines[0]
    assert not out.exists()  # validated at load, before the run directory is written
    for argv in (["--debug", "train", str(path)], ["train", str(path), "--debug"]):
        with pytest.raises(ConfigError, match=r"model\.objective\.anchor"):
            main(argv)


def test_missing_files_and_stopped_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.startswith("mmalign: error: ")

    def stopped(*args: object, **kwargs: object) -> None:
        raise TrainingStopped("non-finite loss at step 3\nlower train.lr")

    monkeypatch.setattr(mmalign.training, "train", stopped)
    config = tmp_path / "run.yaml"  # read (not validated in full) before training starts
    config.write_text("model: {}\n")
    assert main(["train", str(config)]) == 1
    assert capsys.readouterr().err == "mmalign train: non-finite loss at step 3; lower train.lr\n"
    with pytest.raises(TrainingStopped):
        main(["--debug", "train", str(config)])


def test_one_line_joins_a_multi_line_message() -> None:
    assert (
        one_line("invalid config:\n  a.b: bad\n\n  c: worse")
        == "invalid config: a.b: bad; c: worse"
    )
    assert one_line("plain") == "plain"


def test_search_query_strings_are_parsed_by_the_cli(tmp_path: Path) -> None:
    towers = {
        "x": {"type": "tabular", "in_features": 2},
        "caption": {"type": "text"},
        "g": {"type": "graph", "in_features": 2},
    }
    model = SimpleNamespace(modalities=list(towers), config=ModelConfig(towers=towers))
    assert resolve_query_modality(model, "text") == "caption"
    assert resolve_query_modality(model, "x") == "x"
    with pytest.raises(UserError, match="no modality or tower type 'image' \\(--query\\)"):
        resolve_query_modality(model, "image")
    assert parse_raw(model, "x", "[1, 2.5]") == [1, 2.5]
    with pytest.raises(UserError, match="JSON list"):
        parse_raw(model, "x", "1,2")
    assert parse_raw(model, "caption", "[not json]") == "[not json]"
    graph = tmp_path / "g.json"
    graph.write_text('{"x": [[0.0, 1.0], [2.0, 3.0]], "edge_index": [[0, 1], [1, 0]]}')
    decoded = parse_raw(model, "g", str(graph))  # decoded as a record's, within the limits
    assert decoded["x"].tolist() == [[0.0, 1.0], [2.0, 3.0]]
    assert decoded["edge_index"].tolist() == [[0, 1], [1, 0]]
    graph.write_text('{"nodes": [[0.0]], "edges": []}')
    with pytest.raises(UserError, match=r"refused \(bad_graph\).*\(--query g=\.\.\.\)"):
        parse_raw(model, "g", str(graph))
    with pytest.raises(UserError, match=r"does not exist \(--query g=\.\.\.\)"):
        parse_raw(model, "g", str(tmp_path / "missing.json"))
    with pytest.raises(SystemExit):  # a --query without '=' is a usage error
        main(["search", "emb", "--query", "nope"])


WARNING_SCRIPT = """
import sys, warnings
from mmalign.cli import demo
from mmalign.cli.main import main

def run(args):
    warnings.warn("dim 4 is not a trained prefix; figures may be low")
    return 0

demo.run = run
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.launches
@pytest.mark.parametrize("debug", [False, True])
def test_warnings_are_one_line_unless_debug(debug: bool) -> None:
    """A warning raised under a subcommand prints as one ``mmalign: warning:`` line; with
    ``--debug`` Python's own form (file, line number, source) is kept."""
    arguments = ["--debug", "demo"] if debug else ["demo"]
    done = subprocess.run(
        [sys.executable, "-c", WARNING_SCRIPT, *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    if debug:
        assert "<string>:7: UserWarning: dim 4 is not a trained prefix" in done.stderr
    else:
        assert done.stderr == (
            "mmalign: warning: UserWarning: dim 4 is not a trained prefix; figures may be low\n"
        )
