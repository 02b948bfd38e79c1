"""Run configs: typed validation whose errors name the field, file checks, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmalign.config import ConfigError, load_config
from mmalign.convert import to_open_clip
from mmalign.model import AlignmentModel
from mmalign.training import train
from mmalign.training.checks import check_run_config, total_steps
from tests.train_support import tiny_config, write_shards


@pytest.fixture(scope="module")
def pattern(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"), "train", shards=2, per_shard=8)


def _error(config: dict, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        check_run_config(load_config(config, overrides))
    return str(caught.value)


def test_unknown_key_and_wrong_type_name_the_field(tmp_path: Path, pattern: str) -> None:
    config = tiny_config(tmp_path, pattern, train={"stepz": 3, "lr": "fast"})
    message = _error(config)
    assert "train.stepz: unknown key" in message
    assert "train.lr: Input should be a valid number" in message
    bad_metric = tiny_config(tmp_path, pattern, eval={"best_metric": "loss"})
    assert "eval.best_metric" in _error(bad_metric)


def test_missing_files_name_the_field(tmp_path: Path, pattern: str) -> None:
    missing_shard = pattern.replace("{000000..000001}", "{000000..000002}")
    config = tiny_config(
        tmp_path,
        missing_shard,
        data={"classes": str(tmp_path / "nope.json")},
        eval={"zeroshot_modality": "x"},
    )
    message = _error(config)
    assert "data.train: 1 of 3 shards" in message and "train-000002.tar" in message
    assert f"data.classes: file {tmp_path / 'nope.json'} does not exist" in message
    assert "eval.zeroshot_text: the model has no text tower" in message
    no_val = tiny_config(tmp_path, pattern, eval={"every": 5})
    assert "eval.every: periodic validation needs data.val" in _error(no_val)


def test_missing_tokenizer_names_the_tower_field(tmp_path: Path, pattern: str) -> None:
    config = tiny_config(tmp_path / "run", pattern)
    config["model"]["towers"]["text"] = {"type": "text", "tokenizer": str(tmp_path / "spm.model")}
    config["data"]["fields"]["text"] = "txt"
    with pytest.raises(ConfigError, match=r"model\.towers\.text\.tokenizer: .*does not exist"):
        train(config)


def test_sections_must_agree(tmp_path: Path, pattern: str) -> None:
    config = tiny_config(tmp_path, pattern, train={"epochs": 2, "steps": None})
    config["data"]["fields"]["z"] = "z.npy"
    del config["data"]["fields"]["y"]
    message = _error(config)
    assert "data.fields: modality 'y' has no record extension" in message
    assert "data.fields.z: not a modality of model.towers" in message
    assert "train.epochs: needs data.epoch_samples" in message


def test_overrides_apply_to_a_yaml_file(tmp_path: Path, pattern: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, pattern)))
    config = load_config(
        path, ["train.steps=7", "data.batch_size=3", "model.towers.x.hidden=5", "train.lr=2e-4"]
    )
    assert (config.train.steps, config.data.batch_size, config.train.lr) == (7, 3, 2e-4)
    assert config.model.towers["x"].hidden == 5
    with pytest.raises(ConfigError, match=r"train\.stepss: unknown key"):
        load_config(path, ["train.stepss=7"])


def test_epochs_set_the_number_of_steps(tmp_path: Path, pattern: str) -> None:
    config = load_config(
        tiny_config(
            tmp_path,
            pattern,
            train={"epochs": 3, "steps": None, "accumulate": 2},
            data={"epoch_samples": 100},
        )
    )
    # per process: 100 samples an epoch, 8 x 2 samples a step -> 3 * 100 / 16 = 18.75 -> 19
    assert total_steps(config) == 19


ROOT = Path(__file__).parents[2]
CONFIGS = sorted(
    [*(ROOT / "configs").glob("*.yaml"), *(ROOT / "mmalign/demo/configs").glob("*.yaml")]
)


@pytest.mark.parametrize("path", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_shipped_configs_are_valid(path: Path, tmp_path: Path) -> None:
    config = load_config(path)
    assert config.train.output == f"runs/{path.stem}"
    assert list(config.data.fields) == list(config.model.towers)
    if path.stem.startswith("demo_"):  # tiny towers: build them (nothing downloads)
        # digits-sum starts its image/text towers from the digits run's open_clip folder,
        # which exists only after that run: convert an untrained digits model instead.
        pretrained = [
            name
            for name, tower in config.model.towers.items()
            if getattr(tower, "pretrained", None)
        ]
        if pretrained:
            digits = AlignmentModel.from_config(load_config(path.parent / "demo_digits.yaml"))
            to_open_clip(digits, tmp_path / "open_clip")
        overrides = [
            f"model.towers.{name}.pretrained=local-dir:{tmp_path / 'open_clip'}"
            for name in pretrained
        ]
        model = AlignmentModel.from_config(load_config(path, overrides))
        assert model.modalities == list(config.model.towers)
