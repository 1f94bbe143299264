"""Micro-batching of concurrent ``/recommend`` requests on one inference thread.

A request never waits for company: the worker takes whatever is queued the moment the
previous batch finishes, so there is no added wait at low load and batches grow with load.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any

from serving.scoring import Job

__all__ = ["MicroBatcher", "BatchRunner"]

# (jobs) -> one result per job, in order (engine.Server.run_batch: (snapshot, 1-based indices, scores)); runs on
# the executor. Each job carries its own result, so one batch may hold jobs of two snapshots around a swap.
BatchRunner = Callable[[list[Job]], list[Any]]


class MicroBatcher:
    """Runs queued jobs in batches of at most ``max_batch`` on ``executor`` (one thread).

    ``batches`` and ``jobs`` count what has been run (for ``/model``). A job whose caller
    went away before its batch started is dropped; a batch that raises fails all its jobs.
    """

    def __init__(self, run: BatchRunner, executor: ThreadPoolExecutor, max_batch: int) -> None:
        self._run = run
        self._executor = executor
        self._max_batch = max_batch
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self.batches = 0
        self.jobs = 0

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._worker())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task

    async def submit(self, job: Job) -> Any:
        """Queue ``job`` and wait for its batch -> the runner's result for it."""
        assert self._queue is not None, "MicroBatcher.start() first"
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((job, fut))
        return await fut

    async def _worker(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [(j, f) for j, f in batch if not f.done()]  # client went away
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._run, [j for j, _ in batch])
            except Exception as exc:
                for _, f in batch:
                    if not f.done():
                        f.set_exception(exc)
                continue
            self.batches += 1
            self.jobs += len(batch)
            for (_, f), r in zip(batch, results, strict=True):
                if not f.done():
                    f.set_result(r)
