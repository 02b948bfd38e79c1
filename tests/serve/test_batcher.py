"""Dynamic batching: concurrent samples are encoded in one forward pass, each result equal
to encoding it alone; a sample the tower refuses fails alone; max_batch bounds a batch."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from mmalign.eval.loading import load_model
from mmalign.serve.batcher import DynamicBatcher
from tests.serve_support import ServedFixture

TEXTS = [f"the digit {word}" for word in ("zero", "one", "two", "three", "four", "five")]


async def _encode_all(batcher: DynamicBatcher, raws: list, dim: int | None) -> list:
    batcher.start()
    try:
        return await asyncio.gather(
            *(batcher.encode("text", raw, dim) for raw in raws), return_exceptions=True
        )
    finally:
        await batcher.stop()


@pytest.mark.parametrize("dim", [None, 16])
def test_concurrent_samples_share_one_forward(served: ServedFixture, dim: int | None) -> None:
    model = load_model(served.model_dir)
    sizes: list[int] = []
    batcher = DynamicBatcher(model, max_batch=32, max_wait_s=0.2, on_batch=sizes.append)
    rows = asyncio.run(_encode_all(batcher, TEXTS, dim))
    assert sizes == [len(TEXTS)]
    alone = torch.cat([model.encode("text", [text], batch_size=1, dim=dim) for text in TEXTS])
    np.testing.assert_allclose(torch.stack(rows).numpy(), alone.numpy(), rtol=0, atol=1e-6)


def test_a_refused_sample_fails_alone_and_max_batch_bounds_batches(
    served: ServedFixture,
) -> None:
    model = load_model(served.model_dir)
    sizes: list[int] = []
    batcher = DynamicBatcher(model, max_batch=4, max_wait_s=0.2, on_batch=sizes.append)
    rows = asyncio.run(_encode_all(batcher, [*TEXTS[:3], 12345, *TEXTS[3:]], None))
    assert isinstance(rows[3], Exception)
    assert all(isinstance(row, torch.Tensor) for i, row in enumerate(rows) if i != 3)
    assert max(sizes) <= 4 and sizes[:2] == [4, 1]  # the failing batch, then its first alone
