"""The open objective registry: objectives named in YAML, their config checked at load."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import yaml

import mmalign
from mmalign.config import load_config
from mmalign.errors import ConfigError
from mmalign.objectives import PairwiseConfig, build_objective, register_objective
from mmalign.objectives.base import TermLoss
from mmalign.objectives.clip import ClipObjective
from mmalign.objectives.distributed import BatchView
from mmalign.registry import OBJECTIVE_OPTIONS, OBJECTIVES
from tests.train_support import metrics, tiny_config, write_shards


class ScaledClipConfig(PairwiseConfig):
    """CLIP with the temperature multiplied by ``factor`` (a field of its own)."""

    factor: float = 1.0


@register_objective("test_scaled_clip")
class ScaledClipObjective(ClipObjective):
    config_class = ScaledClipConfig

    def terms(
        self,
        batch: BatchView,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> list[TermLoss]:
        return super().terms(batch, logit_scale * self.config.factor, logit_bias, generator)


def _embeddings(names: Sequence[str], rows: int = 6) -> dict[str, torch.Tensor]:
    return {name: torch.nn.functional.normalize(torch.randn(rows, 5), dim=-1) for name in names}


def test_a_registered_objective_is_found_by_name_with_its_own_fields() -> None:
    assert "test_scaled_clip" in OBJECTIVES.names()
    objective = build_objective({"name": "test_scaled_clip", "factor": 3.0})
    assert isinstance(objective, ScaledClipObjective) and objective.config.factor == 3.0
    embeddings = _embeddings(["a", "b"])
    scaled = objective(embeddings, torch.tensor(2.0)).loss
    plain = build_objective({"name": "clip"})(embeddings, torch.tensor(6.0)).loss
    torch.testing.assert_close(scaled, plain)
    with pytest.raises(ConfigError, match=r"model\.objective\.factr: unknown key"):
        build_objective({"name": "test_scaled_clip", "factr": 3.0})


def test_a_registered_objective_trains_from_a_yaml_config(tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "data", "train", shards=2, per_shard=24)
    config = tiny_config(tmp_path / "run", shards, train={"steps": 6})
    config["model"]["objective"] = {"name": "test_scaled_clip", "factor": 2.0}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    result = mmalign.train(path)
    assert result.steps == 6
    losses = [
        record["train/loss"] for record in metrics(tmp_path / "run") if "train/loss" in record
    ]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["objective"]["factor"] == 2.0
    model = mmalign.AlignmentModel.from_pretrained(result.model_dir)
    assert isinstance(model.objective, ScaledClipObjective) and model.objective.config.factor == 2.0


def test_an_objective_fault_fails_at_load_and_writes_nothing(tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "run", str(tmp_path / "none-{000000..000001}.tar"))
    config["model"]["objective"] = {"name": "anchored", "anchor": "nope"}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(
        ConfigError, match=r"model\.objective\.anchor: 'nope' is not one of"
    ) as error:
        mmalign.train(path)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("objective", "field"),
    [
        (
            {"name": "nope"},
            r"model\.objective\.name: unknown objective 'nope' \(dict\); registered: .*clip",
        ),
        ({"name": "clip", "pairs": [["x", "z"]]}, r"model\.objective\.pairs: \['x', 'z'\]"),
        ({"name": "clip", "weights": {"x-z": 1.0}}, r"model\.objective\.weights: keys \['x-z'\]"),
        ({"name": "symile", "negatives": "n3"}, r"model\.objective\.negatives: Input should be"),
        ({"name": "anchored"}, r"model\.objective\.anchor: Field required"),
    ],
)
def test_objective_config_errors_name_the_field(
    tmp_path: Path, objective: dict, field: str
) -> None:
    config = tiny_config(tmp_path / "run", "unused.tar")
    config["model"]["objective"] = objective
    with pytest.raises(ConfigError, match=field):
        load_config(config)


def test_every_objective_has_its_config_class_as_its_options() -> None:
    """``mmalign train`` checks ``model.objective`` with OBJECTIVE_OPTIONS before importing
    torch: each objective's options are its ``config_class`` (a plugin's through
    ``register_objective``), and the built-in ones live in modules without torch."""
    assert OBJECTIVE_OPTIONS.names() == OBJECTIVES.names()
    for name in OBJECTIVES.names():
        assert OBJECTIVE_OPTIONS.get(name) is OBJECTIVES.get(name).config_class, name
    assert OBJECTIVE_OPTIONS.get("test_scaled_clip") is ScaledClipConfig
    assert "clpi" not in OBJECTIVE_OPTIONS
