"""Objective and optimizer config faults are refused when the config loads, naming the field,
before the run directory is touched; the fixed config then trains, with or without
``--resume``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import fork_mmalign, tiny_config, write_config

from mmalign.cli.main import main
from mmalign.config import ConfigError
from mmalign.training import train

ONE_TOWER = [
    "model.towers={labs: {type: tabular, in_features: 6}}",
    "data.fields={labs: npy}",
]
CONFIG_FAULTS: dict[str, tuple[list[str], str]] = {
    # fault: (overrides, the field the error must name)
    "anchored without an anchor": (["model.objective={name: anchored}"], "model.objective.anchor"),
    "unknown anchor": (
        ["model.objective={name: anchored, anchor: video}"],
        "model.objective.anchor",
    ),
    "pair naming an unknown modality": (
        ["model.objective.pairs=[[labs, video]]"],
        "model.objective.pairs",
    ),
    "negative weight": (["model.objective.weights={labs-graph: -1}"], "model.objective.weights"),
    "NaN weight": (["model.objective.weights={labs-graph: .nan}"], "model.objective.weights"),
    "all weights zero": (["model.objective.weights={labs-graph: 0}"], "model.objective.weights"),
    "symile with one modality": (
        ["model.objective={name: symile}", *ONE_TOWER],
        "model.objective.name",
    ),
    "clip with one modality": (ONE_TOWER, "model.objective.name"),
    "logit_scale_max=-inf": (["model.logit_scale_max=-.inf"], "model.logit_scale_max"),
    "logit_bias_init=nan": (["model.logit_bias_init=.nan"], "model.logit_bias_init"),
    "epoch_samples=0": (["data.epoch_samples=0", "train.epochs=1"], "data.epoch_samples"),
    "epoch_samples<0": (["data.epoch_samples=-5", "train.epochs=1"], "data.epoch_samples"),
    "betas outside [0, 1)": (["train.betas=[0.9, 1.0]"], "train.betas"),
    "negative beta": (["train.betas=[-0.1, 0.99]"], "train.betas"),
    "block_size too large for memory": (
        ["model.objective={name: symile, negatives: n2, block_size: 1000000000000}"],
        "model.objective.block_size",
    ),
}


ERROR_FORM = re.compile(r"mmalign: error: [^\n]*[^ ] \((?P<where>[^()]+)\); [^\n]*[^ ]\n")
"""The one-line form: ``mmalign: error: <what> (<where>); <what to do>``."""


@pytest.mark.parametrize("fault", sorted(CONFIG_FAULTS))
def test_config_fault_refused_at_load_naming_the_field(
    tmp_path: Path, shards: str, fault: str, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides, field = CONFIG_FAULTS[fault]
    run = tmp_path / "run"
    config = tiny_config(run, shards, train={"steps": 2})
    with pytest.raises(ConfigError, match=r"(^|\s)" + re.escape(field) + ": "):
        train(config, overrides)
    assert not run.exists(), "the run directory was touched"
    arguments = [f"--set={override}" for override in overrides]
    assert main(["train", str(write_config(tmp_path / "run.yaml", config)), *arguments]) == 2
    error = capsys.readouterr().err
    found = ERROR_FORM.fullmatch(error)  # pydantic's own advice had no "; what to do" part
    assert found is not None and "https://" not in error, error
    assert found["where"].startswith("--set ") or field in found["where"], error


@pytest.mark.launches
def test_cli_refuses_then_the_fixed_config_trains_with_and_without_resume(
    tmp_path: Path, shards: str, capfd: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", tiny_config(run, shards, train={"steps": 2}))
    status = fork_mmalign(
        ["train", str(config), "--set", "model.objective={name: anchored, anchor: video}"]
    )
    assert status == 2
    error = capfd.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("mmalign: error: ") and "model.objective.anchor: " in error
    assert not run.exists()
    fixed = ["--set", "model.objective={name: anchored, anchor: labs}"]
    assert fork_mmalign(["train", str(config), "--resume", *fixed]) == 0
    assert (run / "model" / "model.safetensors").is_file()

    other = tmp_path / "other"
    config = write_config(tmp_path / "other.yaml", tiny_config(other, shards, train={"steps": 2}))
    assert fork_mmalign(["train", str(config), "--set", "model.logit_bias_init=.nan"]) == 2
    assert fork_mmalign(["train", str(config)]) == 0
