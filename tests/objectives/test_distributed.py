"""Two real processes (gloo): every objective's loss and gradients equal one process holding
the whole batch, with uneven rows per rank and missing modalities."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mmalign.objectives import build_objective

pytestmark = pytest.mark.launches

CONFIGS = [
    {"name": "clip"},
    {"name": "anchored", "anchor": "b"},
    {"name": "sigmoid"},
    {"name": "symile", "negatives": "n"},
    {"name": "symile", "negatives": "n2", "block_size": 4},
]
MODALITIES = ["a", "b", "c"]
ROWS_PER_RANK = [5, 3]


class _TinyModel(nn.Module):
    """One linear layer per modality, a learned temperature and (sigmoid only) a bias."""

    def __init__(self, with_bias: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleDict({m: nn.Linear(4, 6, dtype=torch.float64) for m in MODALITIES})
        self.log_scale = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
        self.bias = nn.Parameter(torch.tensor(-2.0, dtype=torch.float64)) if with_bias else None

    def forward(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {m: F.normalize(layer(inputs), dim=-1) for m, layer in self.layers.items()}


def _batch():
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(sum(ROWS_PER_RANK), 4, generator=generator, dtype=torch.float64)
    present = torch.ones(sum(ROWS_PER_RANK), 3, dtype=torch.bool)
    for row, column in [(0, 0), (2, 1), (3, 2), (5, 0), (6, 2), (7, 1), (7, 2)]:
        present[row, column] = False
    return inputs, present


def _step(model, module, objective, inputs, present, groups=None):
    """One forward + backward of ``objective`` (built) on ``model``'s embeddings: the loss,
    its metrics and the gradients of the embeddings and of ``module``'s parameters."""
    embeddings = model(inputs)
    for embedding in embeddings.values():
        embedding.retain_grad()
    out = objective(
        embeddings,
        module.log_scale.exp(),
        module.bias,
        present=present,
        generator=torch.Generator().manual_seed(7),
        groups=groups,
    )
    out.loss.backward()
    return {
        "loss": out.loss.detach(),
        "metrics": out.metrics,
        "metric_loss": out.metrics["loss"],
        "embedding_grads": {m: e.grad for m, e in embeddings.items()},
        "parameter_grads": {n: p.grad.clone() for n, p in module.named_parameters()},
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {"world_size": dist.get_world_size()}
        inputs, present = _batch()
        start = sum(ROWS_PER_RANK[:rank])
        rows = slice(start, start + ROWS_PER_RANK[rank])
        for index, config in enumerate(CONFIGS):
            module = _TinyModel(with_bias=config["name"] == "sigmoid")
            model = DistributedDataParallel(module)
            objective = build_objective(config)
            results[index] = _step(model, module, objective, inputs[rows], present[rows])
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert [result["world_size"] for result in ranks] == [2, 2]
    inputs, present = _batch()
    for index, config in enumerate(CONFIGS):
        module = _TinyModel(with_bias=config["name"] == "sigmoid")
        single = _step(module, module, build_objective(config), inputs, present)
        distributed = [result[index] for result in ranks]
        mean_loss = (distributed[0]["loss"] + distributed[1]["loss"]) / 2
        torch.testing.assert_close(mean_loss, single["loss"], rtol=1e-10, atol=0, msg=str(config))
        for result in distributed:
            assert abs(result["metric_loss"] - single["loss"].item()) < 1e-10, config
            for name, grad in single["parameter_grads"].items():
                torch.testing.assert_close(
                    result["parameter_grads"][name], grad, rtol=1e-9, atol=1e-12, msg=name
                )
        for m in MODALITIES:
            # each rank's embedding gradient is that of the sum of both ranks' losses
            gathered = torch.cat([result["embedding_grads"][m] for result in distributed]) / 2
            torch.testing.assert_close(
                gathered, single["embedding_grads"][m], rtol=1e-9, atol=1e-12
            )
