"""The micro-batcher (serving/batching.py): batches form under load only, are capped, fail together."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from serving.batching import MicroBatcher


@pytest.fixture
def executor():
    ex = ThreadPoolExecutor(1)
    yield ex
    ex.shutdown(wait=True)


def _echo(calls: list[list]):
    """A batch runner that records each batch and answers every job with ``("v1", (job, job))``."""

    def run(jobs: list) -> list:
        calls.append(list(jobs))
        return [("v1", (j, j)) for j in jobs]

    return run


def test_jobs_queued_together_run_as_one_batch_and_each_gets_its_own_result(executor):
    calls: list[list] = []

    async def scenario():
        batcher = MicroBatcher(_echo(calls), executor, max_batch=64)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(5)))
        await batcher.stop()
        return batcher, results

    batcher, results = asyncio.run(scenario())

    assert calls == [[0, 1, 2, 3, 4]]
    assert results == [("v1", (i, i)) for i in range(5)]
    assert (batcher.batches, batcher.jobs) == (1, 5)


def test_a_batch_never_exceeds_max_batch(executor):
    calls: list[list] = []

    async def scenario():
        batcher = MicroBatcher(_echo(calls), executor, max_batch=2)
        batcher.start()
        await asyncio.gather(*(batcher.submit(i) for i in range(5)))
        await batcher.stop()
        return batcher

    batcher = asyncio.run(scenario())

    assert calls == [[0, 1], [2, 3], [4]]
    assert (batcher.batches, batcher.jobs) == (3, 5)


def test_a_failing_batch_fails_each_of_its_jobs_and_the_worker_goes_on(executor):
    def run(jobs: list) -> list:
        if "bad" in jobs:
            raise RuntimeError("forward failed")
        return [("v1", (j, j)) for j in jobs]

    async def scenario():
        batcher = MicroBatcher(run, executor, max_batch=64)
        batcher.start()
        failed = await asyncio.gather(batcher.submit("bad"), batcher.submit("ok"), return_exceptions=True)
        after = await batcher.submit("later")
        await batcher.stop()
        return batcher, failed, after

    batcher, failed, after = asyncio.run(scenario())

    assert all(isinstance(r, RuntimeError) and str(r) == "forward failed" for r in failed)
    assert after == ("v1", ("later", "later"))
    assert (batcher.batches, batcher.jobs) == (1, 1)  # only batches that ran are counted


def test_a_job_whose_caller_went_away_is_not_run(executor):
    calls: list[list] = []
    release = threading.Event()
    echo = _echo(calls)

    def run(jobs: list) -> list:
        if jobs == ["first"]:
            release.wait(timeout=10)  # hold the inference thread while more jobs queue
        return echo(jobs)

    async def scenario():
        batcher = MicroBatcher(run, executor, max_batch=64)
        batcher.start()
        first = asyncio.create_task(batcher.submit("first"))
        await asyncio.sleep(0.05)  # the first batch is running
        gone = asyncio.create_task(batcher.submit("gone"))
        kept = asyncio.create_task(batcher.submit("kept"))
        await asyncio.sleep(0)
        gone.cancel()
        release.set()
        results = await first, await kept
        await batcher.stop()
        return results

    first, kept = asyncio.run(scenario())

    assert calls == [["first"], ["kept"]]
    assert (first, kept) == (("v1", ("first", "first")), ("v1", ("kept", "kept")))


def test_submit_before_start_is_refused(executor):
    batcher = MicroBatcher(_echo([]), executor, max_batch=4)

    with pytest.raises(AssertionError, match="start"):
        asyncio.run(batcher.submit("job"))
