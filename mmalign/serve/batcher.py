"""Dynamic batching: the queries that arrive while the towers are busy, or within
:data:`MAX_WAIT_S` of the first, are encoded together, one forward pass per tower.

Each request submits its raw samples (one per query modality) and awaits their embeddings.
One asyncio task drains the queue: it takes the first waiting sample, waits at most
``max_wait_s`` for more (up to ``max_batch`` samples), groups them by modality and dim, and
encodes each group with :meth:`~mmalign.model.AlignmentModel.encode` in a worker thread
(one forward at a time: the towers are shared, torch uses the cores). While a forward runs,
new requests queue and form the next batch, so throughput grows with concurrency. A batch
whose encoding fails is retried sample by sample, so one bad query fails alone.

Defaults: ``max_batch`` 32 (a CPU forward of 32 short texts costs a few times one text;
larger batches add latency without much throughput) and ``max_wait_s`` 2 ms (one request
alone waits at most that; under load the queue fills during the previous forward anyway).
``max_batch=1`` is one-request-per-forward serving (the benchmark's baseline).

Example:
    >>> batcher = DynamicBatcher(model, max_batch=32, max_wait_s=0.002)  # doctest: +SKIP
    >>> vector = await batcher.encode("text", "the digit seven", dim=None)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from mmalign.model import AlignmentModel

MAX_BATCH = 32
"""Default largest number of samples encoded in one forward pass."""
MAX_WAIT_S = 0.002
"""Default longest wait for more samples after the first (seconds)."""


@dataclass
class _Pending:
    modality: str
    raw: Any
    dim: int | None
    future: asyncio.Future[torch.Tensor]


class DynamicBatcher:
    """Encode queued samples in batches (see the module docstring); ``on_batch(size)`` is
    called for every forward pass (the metrics' batch-size histogram)."""

    def __init__(
        self,
        model: AlignmentModel,
        *,
        max_batch: int = MAX_BATCH,
        max_wait_s: float = MAX_WAIT_S,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch >= 1 and max_wait_s >= 0, got {max_batch}, {max_wait_s}")
        self.model = model
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start draining the queue (in the running event loop)."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop the drain task (the server is shutting down)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def encode(self, modality: str, raw: Any, dim: int | None) -> torch.Tensor:
        """The ``[dim]`` embedding of one raw sample, encoded in a batch with others."""
        if self._queue is None:
            self.start()
        assert self._queue is not None
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(modality, raw, dim, future))
        return await future

    async def _collect(self, queue: asyncio.Queue[_Pending]) -> list[_Pending]:
        batch = [await queue.get()]
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            batch = await self._collect(self._queue)
            groups: dict[tuple[str, int | None], list[_Pending]] = {}
            for item in batch:
                groups.setdefault((item.modality, item.dim), []).append(item)
            for (modality, dim), items in groups.items():
                await self._encode_group(modality, dim, items)

    async def _encode_group(self, modality: str, dim: int | None, items: list[_Pending]) -> None:
        if self.on_batch is not None:
            self.on_batch(len(items))
        raws = [item.raw for item in items]
        try:
            rows = await asyncio.to_thread(self._forward, modality, raws, dim)
        except Exception as error:  # a sample the tower cannot take: find which, alone
            if len(items) == 1:
                _settle(items[0].future, error=error)
                return
            for item in items:
                await self._encode_group(modality, dim, [item])
            return
        for item, row in zip(items, rows):
            _settle(item.future, result=row)

    def _forward(self, modality: str, raws: list[Any], dim: int | None) -> torch.Tensor:
        return self.model.encode(modality, raws, batch_size=len(raws), dim=dim).float().cpu()


def _settle(
    future: asyncio.Future[torch.Tensor],
    result: torch.Tensor | None = None,
    error: BaseException | None = None,
) -> None:
    """Resolve a request's future unless the request went away (a client that hung up)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert result is not None
        future.set_result(result)
