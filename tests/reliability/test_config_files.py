"""Config files that are not what they seem are refused in one line naming the file: a key
given twice (PyYAML keeps the last silently), a binary file, nesting deep enough to exhaust
the parser's recursion, and Matryoshka weights that are not finite."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import subprocess_env, tiny_config, write_config

from mmalign.cli.main import main
from mmalign.config import ConfigError, load_config
from mmalign.model import AlignmentModel

TWO_TOWERS = "model: {towers: {labs: {type: tabular, in_features: 2}, text: {type: text}}"
"""A ``model`` mapping left open after its towers, for the objective cases."""

DOUBLE_TRAIN = """\
model:
  dim: 8
  towers: {labs: {type: tabular, in_features: 6}, graph: {type: graph, in_features: 2}}
train:
  steps: 100
data:
  train: shards/train-{000000..000002}.tar
train:
  lr: 0.01
"""


def test_a_section_given_twice_names_the_key_and_both_lines(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(DOUBLE_TRAIN)
    with pytest.raises(
        ConfigError,
        match=r"key 'train' appears twice \(lines 4 and 8\) in the config file \(.*run.yaml\)",
    ):
        load_config(config)


def test_a_key_given_twice_inside_a_section_or_a_flow_mapping(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  steps: 1\n  lr: 0.1\n  steps: 2\n")
    with pytest.raises(ConfigError, match=r"key 'steps' appears twice \(lines 2 and 4\)"):
        load_config(config)
    config.write_text("model: {dim: 8, dim: 16}\n")
    with pytest.raises(ConfigError, match=r"key 'dim' appears twice \(lines 1 and 1\)"):
        load_config(config)


def test_merge_keys_still_override(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        "base: &base {type: tabular, in_features: 6, hidden: 4}\n"
        "model:\n  towers:\n    labs:\n      <<: *base\n      hidden: 16\n"
    )
    with pytest.raises(ConfigError, match="base: unknown key"):  # merged, no duplicate error
        load_config(config)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", r"is not UTF-8 text at byte 0 \("),
        (b"a: " + b"[" * 20000 + b"]" * 20000, "is nested too deeply to read"),
        (b"a: " + b"{b: " * 20000 + b"}" * 20000, "is nested too deeply to read"),
    ],
    ids=["binary", "deep list", "deep mapping"],
)
def test_binary_or_deeply_nested_config_is_one_line(
    tmp_path: Path, content: bytes, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "run.yaml"
    config.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_config(config)
    assert main(["train", str(config)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("mmalign: error: the config file is ")
    assert f" ({config}); " in error


@pytest.mark.parametrize("weight", [".nan", ".inf", "-.inf"])
def test_non_finite_matryoshka_weight_refused_at_load(
    tmp_path: Path, shards: str, weight: str
) -> None:
    config = tiny_config(tmp_path / "run", shards)
    overrides = ["model.matryoshka=[4, 8]", f"model.matryoshka_weights=[1.0, {weight}]"]
    with pytest.raises(ConfigError, match=r"model\.matryoshka_weights\.1: .*finite"):
        load_config(config, overrides)


def test_cli_names_the_duplicate_key_in_one_line(
    tmp_path: Path, shards: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "run.yaml", tiny_config(tmp_path / "run", shards))
    config.write_text(config.read_text() + "train:\n  steps: 3\n")
    assert main(["train", str(config)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "key 'train' appears twice (lines " in error
    assert not (tmp_path / "run").exists()


@pytest.mark.launches
@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("model: {}\ntrain: {stepz: 3}\n", "train.stepz: unknown key"),
        ("model: {}\ndata: {batch_size: -1}\n", "data.batch_size: "),
        ("model: {}\ntrian: {steps: 3}\n", "trian: unknown section"),
        ("model: {}\ntrain: {steps: 1}\ntrain: {steps: 2}\n", "key 'train' appears twice"),
        (
            "model: {towers: {img: {type: image, model: RN50, imagesize: 32}}}\n",
            "model.towers.img.imagesize: unknown key",
        ),
        ("model: {towers: {labs: {type: tabular, in_features: six}}}\n", "labs.in_features: "),
        (
            "model: {towers: {ts: {type: timeseries, window: 64, patch: 5, encoder: patch}}}\n",
            "model.towers.ts: patch 5 must divide window 64",
        ),
        ("model: {towers: {g: {type: grpah, in_features: 2}}}\n", "unknown tower type 'grpah'"),
        ("model: {dimm: 8, towers: {}}\n", "model.dimm: unknown key"),
        ("", "model: Field required"),
        ("model: {objective: {name: clpi}}\n", "model.objective.name: unknown objective 'clpi'"),
        (f"{TWO_TOWERS}, objective: {{nme: clip}}}}\n", "model.objective.nme: unknown key"),
        (
            f"{TWO_TOWERS}, objective: {{pairs: [[labs, nope]]}}}}\n",
            "model.objective.pairs: ['labs', 'nope'] needs two different modalities",
        ),
        (
            f"{TWO_TOWERS}, objective: {{weights: {{labs-text: .nan}}}}}}\n",
            "model.objective.weights: ['labs-text'] are NaN or infinite",
        ),
        (
            f"{TWO_TOWERS}, objective: {{name: sigmoid, positives: debiased}}}}\n",
            "model.objective.positives: 'debiased' corrects a softmax denominator",
        ),
    ],
    ids=[
        "train key",
        "data value",
        "section",
        "duplicate",
        "tower key",
        "tower value",
        "tower check",
        "tower type",
        "model key",
        "empty file",
        "objective name",
        "objective key",
        "objective pairs",
        "objective weight",
        "objective check",
    ],
)
def test_a_typo_is_reported_before_torch_loads(tmp_path: Path, text: str, named: str) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(text)
    code = (
        "import sys; from mmalign.cli.main import main; status = main(['train', sys.argv[1]]); "
        "print(status, 'torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(config)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr
    assert named in done.stderr and done.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("[" * 30000 + "]" * 30000, "the value is nested too deeply to read (--set train.lr)"),
        ("{lr: 1, lr: 2}", "key 'lr' appears twice (lines 1 and 1) in the value (--set train.lr)"),
        ("!!python/name:os.system", "the value is not valid YAML: "),
    ],
    ids=["deep", "duplicate", "python tag"],
)
def test_a_set_override_is_read_as_strictly_as_the_file(
    tmp_path: Path, value: str, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--set`` values went through ``yaml.safe_load``: 30,000 brackets ended in a
    RecursionError traceback and a repeated key was kept silently."""
    config = write_config(tmp_path / "run.yaml", tiny_config(tmp_path / "run", "s.tar"))
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(config, [f"train.lr={value}"])
    assert main(["train", str(config), "--set", f"train.lr={value}"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and named in error
    assert not (tmp_path / "run").exists()


ONE_LINE = re.compile(r"mmalign: error: [^\n]*[^ ] \((?P<where>[^()]+)\); [^\n]*[^ ]\n")
"""The one-line form: ``mmalign: error: <what> (<where>); <what to do>``."""


@pytest.mark.timeout(60)  # a FIFO that were opened would block until then
@pytest.mark.parametrize("kind", ["device", "FIFO", "directory"])
def test_a_config_that_is_no_regular_file_is_named_so_and_never_read(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``/dev/zero`` and a FIFO were reported as missing files."""
    path = {"device": Path("/dev/zero"), "FIFO": tmp_path / "run.yaml", "directory": tmp_path}
    if kind == "FIFO":
        os.mkfifo(path[kind])
    problem = "is a directory, not a file" if kind == "directory" else "is not a regular file"
    assert main(["train", str(path[kind])]) == 2
    error = capsys.readouterr().err
    found = ONE_LINE.fullmatch(error)
    assert found is not None and found["where"] == str(path[kind]), error
    assert error.startswith(f"mmalign: error: the config {problem}"), error


def saved_model(directory: Path) -> Path:
    model = AlignmentModel.from_config(
        {"dim": 4, "towers": {"labs": {"type": "tabular", "in_features": 3, "hidden": 8}}}
    )
    return model.save_pretrained(directory)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda text: "[" * 100_000 + "]" * 100_000, "the model config is nested too deeply"),
        (lambda text: text.replace('"dim": 4', '"dim": Infinity'), "dim: Input should be a finite"),
        (lambda text: text[: len(text) // 2], "the model config is not valid JSON: "),
        (
            lambda text: json.dumps({**json.loads(text), "towers": {}}),
            "towers: needs at least one modality",
        ),
    ],
    ids=["deep", "infinite dim", "cut", "no towers"],
)
def test_a_damaged_saved_model_config_is_one_line_naming_the_file(
    tmp_path: Path, damage: Any, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A RecursionError traceback, and pydantic's text with its URL, before."""
    config = saved_model(tmp_path / "model") / "config.json"
    config.write_text(damage(config.read_text()))
    with pytest.raises(ConfigError, match=re.escape(problem)):
        AlignmentModel.from_pretrained(config.parent)
    out = str(tmp_path / "onnx")
    assert main(["convert", str(config.parent), "--to", "onnx", "--out", out]) == 2
    error = capsys.readouterr().err
    found = ONE_LINE.fullmatch(error)
    assert found is not None and found["where"] == str(config), error
    assert "https://" not in error and "input_value" not in error


def test_a_folder_without_a_model_names_the_argument(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty, out = tmp_path / "empty", str(tmp_path / "onnx")
    empty.mkdir()
    assert main(["convert", str(empty), "--to", "onnx", "--out", out]) == 2
    error = capsys.readouterr().err
    found = ONE_LINE.fullmatch(error)
    assert found is not None and found["where"] == "MODEL", error
    assert "neither model.safetensors nor model/model.safetensors" in error


def test_a_huge_value_is_cut_in_the_error_keeping_where_and_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "run.yaml", tiny_config(tmp_path / "run", "s.tar"))
    huge = "x" * 5000
    assert main(["train", str(config), "--set", f"train.lr={huge}"]) == 2
    error = capsys.readouterr().err
    found = ONE_LINE.fullmatch(error)
    assert found is not None and len(error) < 700, error
    assert found["where"].startswith("--set train.lr=xxx") and found["where"].endswith("...")
    assert error.endswith("; give train.lr a valid value (see its description in the docs)\n")


def test_a_training_checkpoint_passed_as_the_model_points_at_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    saved_model(checkpoint)
    (checkpoint / "config.json").unlink()  # what a checkpoint holds: weights, no config
    (checkpoint / "trainer.json").write_text('{"step": 2}')
    out = str(tmp_path / "onnx")
    assert main(["convert", str(checkpoint), "--to", "onnx", "--out", out]) == 2
    error = capsys.readouterr().err
    found = ONE_LINE.fullmatch(error)
    assert found is not None and found["where"] == str(checkpoint), error
    assert f"pass the run directory {tmp_path / 'run'} (its model/)" in error
