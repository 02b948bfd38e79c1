"""Config files that are not what they seem are refused in one line naming the file: a key
given twice (PyYAML keeps the last silently), a binary file, nesting deep enough to exhaust
the parser's recursion, and Matryoshka weights that are not finite."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env, tiny_config, write_config

from mmalign.cli.main import main
from mmalign.config import ConfigError, load_config

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
