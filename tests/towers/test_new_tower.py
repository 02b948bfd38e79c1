"""Adding a tower is one file plus its registry line: a tower type defined and registered in
this file alone trains, saves and loads, exports to ONNX, takes ``trainable.last_blocks``,
``train.layer_decay`` and ``train.gradient_checkpointing``, and wraps under FSDP (its blocks
become FSDP units), with no edit anywhere else in mmalign."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pydantic import Field
from torch import nn

from mmalign.config import ConfigError, TowerConfig, TrainConfig
from mmalign.convert import to_onnx
from mmalign.model import AlignmentModel
from mmalign.towers import Tower, build_tower, register_tower
from mmalign.training.memory_savers import apply_memory_savers
from mmalign.training.optim import build_optimizer


class StackTowerConfig(TowerConfig):
    """``type: test_stack``: a linear stem, ``layers`` residual blocks, a final norm."""

    type: Literal["test_stack"] = "test_stack"
    in_features: int = Field(ge=1)
    width: int = Field(default=16, ge=1)
    layers: int = Field(default=3, ge=1)


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(torch.tanh(self.norm(x)))


@register_tower("test_stack")
class StackTower(Tower):
    """Float vectors to ``[B, width]``; ``augment`` adds a little noise."""

    config_class = StackTowerConfig
    config: StackTowerConfig
    onnx_input = "features"

    def __init__(
        self, config: StackTowerConfig, field: str = "tower", base_dir: Path | None = None
    ) -> None:
        super().__init__(config, field, base_dir)
        self.width = config.width
        self.stem = nn.Linear(config.in_features, config.width)
        self.layers = nn.ModuleList(ResidualBlock(config.width) for _ in range(config.layers))
        self.head = nn.LayerNorm(config.width)

    def preprocess(self, raw: Any, augment: bool = False) -> torch.Tensor:
        vector = torch.as_tensor(np.asarray(raw, dtype=np.float32))
        return vector + 0.01 * torch.randn_like(vector) if augment else vector

    def collate(self, items: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(items))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.stem(inputs)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)

    def example_raw(self) -> Any:
        return np.linspace(-1, 1, self.config.in_features).tolist()


CONFIG = {
    "dim": 8,
    "towers": {
        "x": {"type": "test_stack", "in_features": 6},
        "y": {"type": "test_stack", "in_features": 4, "layers": 2, "width": 12},
    },
}


def paired(rows: int = 32, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """``y`` a noisy linear map of ``x``: pairs a contrastive objective can align."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 6)).astype(np.float32)
    y = (x @ rng.normal(size=(6, 4)) + 0.05 * rng.normal(size=(rows, 4))).astype(np.float32)
    return {"x": list(x), "y": list(y)}


def collated(model: AlignmentModel, raws: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
    return {
        m: model.tower(m).collate([model.tower(m).preprocess(r) for r in rows])
        for m, rows in raws.items()
    }


def test_the_config_is_typed_validated_and_round_trips(tmp_path: Path) -> None:
    model = AlignmentModel.from_config(CONFIG)
    assert type(model.config.towers["x"]) is StackTowerConfig
    assert model.config.modalities_of_type("test_stack") == ["x", "y"]
    with pytest.raises(ConfigError, match=r"model\.towers\.x\.layers: Input should be greater"):
        AlignmentModel.from_config({"towers": {"x": {**CONFIG["towers"]["x"], "layers": 0}}})
    with pytest.raises(ConfigError, match=r"model\.towers\.x\.type: unknown .*test_stack"):
        AlignmentModel.from_config({"towers": {"x": {"type": "test_stak"}}})
    saved = model.save_pretrained(tmp_path / "saved")
    assert json.loads((saved / "config.json").read_text())["towers"]["y"] == CONFIG["towers"]["y"]
    loaded = AlignmentModel.from_pretrained(saved)
    raws = paired(4)["y"]
    torch.testing.assert_close(loaded.encode("y", raws), model.eval().encode("y", raws))


def test_it_trains() -> None:
    torch.manual_seed(0)
    model = AlignmentModel.from_config(CONFIG)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2))
    inputs = collated(model, paired())
    losses = []
    for _ in range(25):
        loss = model.loss(model(inputs)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_it_exports_to_onnx(tmp_path: Path) -> None:
    import onnxruntime

    model = AlignmentModel.from_config(CONFIG).eval()
    to_onnx(model, tmp_path / "onnx")
    manifest = json.loads((tmp_path / "onnx" / "onnx.json").read_text())
    assert manifest["x"]["inputs"] == {"features": "float32"}
    for modality, rows in paired(5).items():  # another batch size than the traced one
        session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / f"{modality}.onnx"))
        (exported,) = session.run(None, {"features": np.stack(rows)})
        with torch.no_grad():
            expected = model.embed(modality, torch.from_numpy(np.stack(rows)))
        np.testing.assert_allclose(exported, expected.numpy(), atol=1e-5)


def test_last_blocks_trains_the_top_blocks_and_the_head() -> None:
    config = {**CONFIG["towers"]["x"], "trainable": {"last_blocks": 1}}
    tower = build_tower(config, field="model.towers.x")
    trained = {name for name, p in tower.named_parameters() if p.requires_grad}
    assert trained == {
        "layers.2.norm.weight",
        "layers.2.norm.bias",
        "layers.2.linear.weight",
        "layers.2.linear.bias",
        "head.weight",
        "head.bias",
    }
    with pytest.raises(ConfigError, match=r"last_blocks: 4 but the tower has 3 blocks"):
        build_tower({**config, "trainable": {"last_blocks": 4}}, field="model.towers.x")


def test_layer_decay_scales_stem_blocks_and_head() -> None:
    model = AlignmentModel.from_config(CONFIG)
    optimizer = build_optimizer(model, TrainConfig(lr=1.0, layer_decay=0.5))
    scale = {id(p): group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}
    tower = model.tower("x")  # 3 blocks: stem 0.5^4, block i 0.5^(3 - i), head 1
    assert scale[id(tower.stem.weight)] == 0.5**4
    assert [scale[id(layer.linear.weight)] for layer in tower.layers] == [0.125, 0.25, 0.5]
    assert scale[id(tower.head.weight)] == 1.0
    assert scale[id(model.projections["x"].weight)] == 1.0
    assert scale[id(model.tower("y").stem.weight)] == 0.5**3  # 2 blocks


def test_gradient_checkpointing_recomputes_the_blocks_with_the_same_gradients() -> None:
    plain = AlignmentModel.from_config(CONFIG)
    checkpointed = copy.deepcopy(plain)
    applied = apply_memory_savers(checkpointed, TrainConfig(gradient_checkpointing=True))
    assert applied["gradient_checkpointing"] == ["x", "y"]
    inputs = collated(plain, paired(8))
    calls = {"plain": 0, "checkpointed": 0}
    grads = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        model.tower("x").layers[0].linear.register_forward_pre_hook(
            lambda *_, n=name: calls.__setitem__(n, calls[n] + 1)
        )
        model.loss(model(inputs)).loss.backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert calls == {"plain": 1, "checkpointed": 2}  # the block ran again in backward
    assert grads["plain"].keys() == grads["checkpointed"].keys()
    for name, grad in grads["plain"].items():
        torch.testing.assert_close(grads["checkpointed"][name], grad, rtol=1e-6, atol=1e-7)


def _shard(rank: int, port: int, output: str) -> None:
    """One of two spawned processes: shard the model with mmalign's FSDP wrapping and report
    the FSDP units of the tower and the embeddings of a fixed batch."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from mmalign.training.parallel.fsdp import shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = AlignmentModel.from_config(CONFIG)
    shard_model(model)
    tower = model.tower("x")
    units = [name for name, m in tower.named_modules() if isinstance(m, FSDPModule)]
    sharded = all(isinstance(p, DTensor) for p in tower.parameters())
    with torch.no_grad():  # through the model's forward: the root unit gathers the projection
        embedding = model({"x": collated(model, paired(4))["x"]})["x"]
    report = {"units": units, "sharded": sharded, "embedding": embedding.tolist()}
    Path(output, f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()  # neither rank tears gloo down while the other still has a collective open
    dist.destroy_process_group()


@pytest.mark.launches
def test_it_wraps_under_fsdp_with_its_blocks_as_units(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_shard, args=(port, str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    model = AlignmentModel.from_config(CONFIG)
    with torch.no_grad():
        expected = model.embed("x", collated(model, paired(4))["x"])
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["units"] == ["", "layers.0", "layers.1", "layers.2"]  # tower + blocks
        assert report["sharded"]
        torch.testing.assert_close(torch.tensor(report["embedding"]), expected)
