"""API misuse raises errors that say what and where; property-based checks that every
objective stays finite (loss and gradients) for any presence pattern and batch size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmalign.config import ConfigError
from mmalign.data.exports import ExportError
from mmalign.export import export_embeddings
from mmalign.model import AlignmentModel
from mmalign.objectives import build_objective

MODEL = {
    "dim": 8,
    "towers": {
        "labs": {"type": "tabular", "in_features": 3, "hidden": 8},
        "graph": {"type": "graph", "in_features": 2, "hidden": 8, "layers": 1},
    },
}
GRAPH = {"x": [[0.0, 1.0], [1.0, 0.0]], "edge_index": [[0, 1], [1, 0]]}


@pytest.fixture(scope="module")
def model() -> AlignmentModel:
    return AlignmentModel.from_config(MODEL).eval()


def collated(model: AlignmentModel, modality: str, raws: list) -> object:
    tower = model.towers[modality]
    return tower.collate([tower.preprocess(raw) for raw in raws])


def test_unknown_modality_is_named(model: AlignmentModel) -> None:
    with pytest.raises(KeyError, match="unknown modality 'audio'; this model knows labs, graph"):
        model.encode("audio", [[1.0, 2.0, 3.0]])
    with pytest.raises(KeyError, match="unknown modality 'audio'"):
        model({"audio": torch.zeros(1, 3)})
    with pytest.raises(ValueError, match="name no term of 'clip'"):
        build_objective({"name": "clip", "weights": {"labs-audio": 1.0}})(
            {"labs": torch.eye(2), "graph": torch.eye(2)}, torch.tensor(10.0)
        )


def test_empty_inputs(model: AlignmentModel) -> None:
    with pytest.raises(ValueError, match=r"encode\('labs', raws\): raws is empty"):
        model.encode("labs", [])
    with pytest.raises(TypeError, match="raws must be a list of samples"):
        model.encode("labs", "1,2,3")
    with pytest.raises(ValueError, match="objective got no embeddings"):
        build_objective({"name": "clip"})({}, torch.tensor(10.0))
    with pytest.raises(ValueError, match="inputs\\['graph'\\] is None; pass `present`"):
        model({"labs": collated(model, "labs", [[1.0, 2.0, 3.0]]), "graph": None})


def test_mismatched_batch_sizes(model: AlignmentModel) -> None:
    inputs = {
        "labs": collated(model, "labs", [[1.0, 2.0, 3.0]] * 3),
        "graph": collated(model, "graph", [GRAPH] * 2),
    }
    with pytest.raises(ValueError, match=r"different batch sizes per modality \{'labs': 3, 'gr"):
        model(inputs)
    present = torch.tensor([[True, True], [True, True], [True, False]])
    with pytest.raises(ValueError, match="inputs\\['labs'\\] has 3 rows but present marks"):
        model(
            {**inputs, "labs": collated(model, "labs", [[1.0, 2.0, 3.0]] * 3)},
            present=present[:, [1, 0]] & torch.tensor([True, False]),
        )
    with pytest.raises(ValueError, match=r"one shape \[B, d\] for every modality"):
        model.loss({"labs": torch.zeros(3, 8), "graph": torch.zeros(2, 8)})
    with pytest.raises(
        ValueError, match=r"present has shape \(2, 2\) but the batch needs \[3, 2\]"
    ):
        model.loss(
            {"labs": torch.zeros(3, 8), "graph": torch.zeros(3, 8)},
            present=torch.ones(2, 2, dtype=torch.bool),
        )


def test_wrong_dtypes_and_shapes(model: AlignmentModel) -> None:
    with pytest.raises(ValueError, match="present must be a bool tensor"):
        model({"labs": collated(model, "labs", [[1.0, 2.0, 3.0]])}, present=torch.ones(1, 1))
    with pytest.raises(
        ValueError, match=r"floating-point embeddings, got \{'labs': 'torch\.int64'"
    ):
        model.loss({"labs": torch.ones(2, 8, dtype=torch.long), "graph": torch.zeros(2, 8)})
    with pytest.raises(ValueError, match=r"one shape \[B, d\]"):
        model.loss({"labs": torch.zeros(2, 8, 1), "graph": torch.zeros(2, 8, 1)})
    with pytest.raises(ValueError, match="3"):
        model.encode("labs", [[1.0, 2.0]])  # in_features is 3
    with pytest.raises(ValueError, match="infinite values at positions \\[1\\]"):
        model.encode("labs", [[1.0, float("inf"), 2.0]])
    with pytest.raises((TypeError, ValueError), match="x"):
        model.encode("graph", [{"edge_index": [[0], [0]]}])
    with pytest.raises(TypeError, match="text tower expects a str"):
        AlignmentModel.from_config(
            {
                "dim": 4,
                "towers": {
                    "text": {
                        "type": "text",
                        "width": 16,
                        "heads": 2,
                        "layers": 1,
                        "context_length": 8,
                    }
                },
            }
        ).encode("text", [b"bytes, not str"])


def test_weights_of_another_config_are_refused(tmp_path: Path) -> None:
    AlignmentModel.from_config(MODEL).save_pretrained(tmp_path / "a")
    other = {
        **MODEL,
        "towers": {**MODEL["towers"], "labs": {**MODEL["towers"]["labs"], "in_features": 5}},
    }
    AlignmentModel.from_config(other).save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").replace(tmp_path / "a" / "model.safetensors")
    with pytest.raises(
        ValueError,
        match=r"(?s)cannot load .*model\.safetensors into the model of "
        r".*config\.json: .*size mismatch for towers\.labs",
    ):
        AlignmentModel.from_pretrained(tmp_path / "a")
    renamed = {
        **MODEL,
        "towers": {"lab_values": MODEL["towers"]["labs"], "graph": MODEL["towers"]["graph"]},
    }
    AlignmentModel.from_config(renamed).save_pretrained(tmp_path / "c")
    (tmp_path / "b" / "config.json").write_text((tmp_path / "c" / "config.json").read_text())
    AlignmentModel.from_config(MODEL).save_pretrained(tmp_path / "d")
    (tmp_path / "d" / "model.safetensors").replace(tmp_path / "b" / "model.safetensors")
    missing = r"missing \['projections\.lab_values\.weight', 'towers\.lab_values"
    with pytest.raises(ValueError, match=rf"does not match .*config\.json: {missing}"):
        AlignmentModel.from_pretrained(tmp_path / "b")


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"model\.towers\.labs\.in_featurs: unknown key"):
        AlignmentModel.from_config(
            {"dim": 4, "towers": {"labs": {"type": "tabular", "in_featurs": 3}}}
        )
    with pytest.raises(ConfigError, match=r"model\.dim"):
        AlignmentModel.from_config({"dim": 0, "towers": MODEL["towers"]})
    with pytest.raises(ConfigError, match=r"model\.freeze: unknown modality audio"):
        AlignmentModel.from_config({**MODEL, "freeze": ["audio"]})


OBJECTIVES = [
    {"name": "clip"},
    {"name": "anchored", "anchor": "m0"},
    {"name": "sigmoid"},
    {"name": "symile", "negatives": "n"},
    {"name": "symile", "negatives": "n2", "block_size": 5},
]


@st.composite
def batches(draw: st.DrawFn) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    modalities = draw(st.integers(2, 3))
    rows = draw(st.integers(1, 6))
    present = draw(
        st.lists(
            st.lists(st.booleans(), min_size=modalities, max_size=modalities),
            min_size=rows,
            max_size=rows,
        )
    )
    seed = draw(st.integers(0, 2**16))
    mask = torch.tensor(present, dtype=torch.bool)
    values = torch.nn.functional.normalize(
        torch.from_numpy(np.random.default_rng(seed).normal(size=(modalities, rows, 4))).float(),
        dim=-1,
    )
    embeddings = {f"m{j}": values[j] * mask[:, j, None] for j in range(modalities)}  # 0 if absent
    return embeddings, mask


@pytest.mark.parametrize("config", OBJECTIVES, ids=lambda c: f"{c['name']}-{c.get('negatives')}")
@settings(max_examples=25, deadline=None)
@given(batch=batches(), log_scale=st.floats(0.0, 4.6), generator_seed=st.integers(0, 100))
def test_objectives_are_finite_for_any_presence(
    config: dict,
    batch: tuple[dict[str, torch.Tensor], torch.Tensor],
    log_scale: float,
    generator_seed: int,
) -> None:
    embeddings, present = batch
    leaves = {name: value.clone().requires_grad_(True) for name, value in embeddings.items()}
    scale = torch.tensor(log_scale, requires_grad=True)
    bias = torch.tensor(-5.0, requires_grad=True) if config["name"] == "sigmoid" else None
    objective = build_objective(config)
    output = objective(
        leaves,
        scale.exp(),
        bias,
        present=present,
        generator=torch.Generator().manual_seed(generator_seed),
    )
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    output.loss.backward()
    gradients = (
        [leaf.grad for leaf in leaves.values()]
        + [scale.grad]
        + ([bias.grad] if bias is not None else [])
    )
    assert all(g is None or torch.isfinite(g).all() for g in gradients)
    for name, leaf in leaves.items():  # an absent row never gets a gradient
        column = list(leaves).index(name)
        if leaf.grad is not None:
            assert torch.all(leaf.grad[~present[:, column]] == 0)


@pytest.mark.parametrize(
    ("option", "flag"), [("chunk_size", "--chunk-size"), ("batch_size", "--batch-size")]
)
def test_export_settings_out_of_range_name_the_flag(
    tmp_path: Path, model: AlignmentModel, option: str, flag: str
) -> None:
    with pytest.raises(ExportError, match=rf"^{option} \({flag}\) must be >= 1, got 0"):
        export_embeddings(model, "unused.tar", ["labs"], tmp_path / "out", **{option: 0})
    assert not (tmp_path / "out").exists()
