"""EmbeddingBatcher on a real ModelPool of FakeEngines: how batches form, what each caller gets back, and
how failures and departures reach the callers. The batch window is driven with ``flush()`` (a window of
an hour never ends by itself) or is 0; nothing here sleeps for time."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from lllmsd.config import parse_config
from lllmsd.core.batcher import EmbeddingBatcher, check_dimensions, shorten
from lllmsd.core.clock import ManualClock
from lllmsd.core.jobs import EmbeddingJob, EmbeddingResult
from lllmsd.core.limit import ConcurrencyLimit
from lllmsd.core.pool import ModelPool
from lllmsd.engines.base import ModelFiles
from lllmsd.engines.fake import FakeEngine
from lllmsd.errors import (
    EngineError,
    InvalidRequest,
    ModelUnavailable,
    QueueTimeout,
    ShuttingDown,
    TooManyRequests,
)

DIMS = 8
HOUR = 3600.0


def expected(text: str, dims: int = DIMS) -> np.ndarray:
    return np.asarray(FakeEngine._vector(text, dims), dtype=np.float32)


@dataclass
class Recorder:
    """An engine class whose instances record every embed call, and can be held, fail, or refuse."""

    calls: list[tuple[Any, ...]] = field(default_factory=list)
    gate: threading.Event | None = None  # set: embed blocks until the test opens it
    started: threading.Event = field(default_factory=threading.Event)
    fail_on: str | None = None  # an input that makes the engine crash
    refuse: str | None = None  # an input the engine refuses as a bad request

    def engine_class(self) -> type:
        recorder = self

        class RecordingEngine(FakeEngine):
            def embed(self, job: EmbeddingJob) -> EmbeddingResult:
                recorder.calls.append(job.inputs)
                recorder.started.set()
                if recorder.gate is not None:
                    recorder.gate.wait(10)
                if recorder.fail_on in job.inputs:
                    raise RuntimeError("the engine broke")
                if recorder.refuse in job.inputs:
                    index = job.inputs.index(recorder.refuse)
                    raise InvalidRequest(f"input[{index}] is refused", param="input")
                return super().embed(job)

        return RecordingEngine


def model(**options: Any) -> Any:
    data = {"task": "embedding", "engine": "fake", "dimensions": DIMS, **options}
    return parse_config({"models": {"emb": data}}).models["emb"]


MakeBatcher = Callable[..., EmbeddingBatcher]


@pytest.fixture
async def make_batcher() -> AsyncIterator[MakeBatcher]:
    pools: list[ModelPool] = []
    batchers: list[EmbeddingBatcher] = []

    def make(
        recorder: Recorder, *, window: float = HOUR, max_batch_size: int = 32, max_waiting: int = 64, **options: Any
    ) -> EmbeddingBatcher:
        async def files() -> ModelFiles:
            return ModelFiles(None)

        config = model(**options)
        pool = ModelPool(
            "emb", config, recorder.engine_class(), files=files, limiter=ConcurrencyLimit(4), clock=ManualClock()
        )
        # the pool's own batcher, with a window the config cannot express (an hour: tests flush() instead)
        batcher = EmbeddingBatcher("emb", pool, window=window, max_batch_size=max_batch_size, max_waiting=max_waiting)
        pool.batcher = batcher
        pools.append(pool)
        batchers.append(batcher)
        return batcher

    yield make
    for pool in pools:
        await pool.close(0)
    for batcher in batchers:
        await batcher.close()


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for what the engine threads make true (instances load and embed in their own threads)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def settle() -> None:
    """Let every asyncio task that can run, run (no time passes)."""
    for _ in range(20):
        await asyncio.sleep(0)


def start(batcher: EmbeddingBatcher, *inputs: str, dimensions: int | None = None) -> asyncio.Task[EmbeddingResult]:
    return asyncio.create_task(batcher.embed(EmbeddingJob(inputs=inputs, dimensions=dimensions)))


def assert_vectors(result: EmbeddingResult, *texts: str) -> None:
    assert len(result.vectors) == len(texts)
    for vector, text in zip(result.vectors, texts, strict=True):
        np.testing.assert_allclose(vector, expected(text), rtol=1e-6)


# ------------------------------------------------------------------------------------- forming batches


async def test_requests_in_one_window_make_one_engine_call_and_each_gets_its_own(make_batcher: MakeBatcher) -> None:
    recorder = Recorder()
    batcher = make_batcher(recorder)
    a, b, c = start(batcher, "alpha"), start(batcher, "beta", "gamma"), start(batcher, "delta")
    await settle()
    assert recorder.calls == []  # the window is still open
    assert batcher.waiting == 3
    batcher.flush()
    results = await asyncio.gather(a, b, c)
    assert recorder.calls == [("alpha", "beta", "gamma", "delta")]
    assert_vectors(results[0], "alpha")
    assert_vectors(results[1], "beta", "gamma")
    assert_vectors(results[2], "delta")
    assert [list(r.token_counts) for r in results] == [[1], [1, 1], [1]]


async def test_a_full_batch_starts_without_waiting_for_the_window(make_batcher: MakeBatcher) -> None:
    recorder = Recorder()
    batcher = make_batcher(recorder, max_batch_size=4)
    tasks = [start(batcher, f"s{i}") for i in range(6)]
    await eventually(lambda: recorder.calls == [("s0", "s1", "s2", "s3")])
    assert batcher.waiting == 2  # s4, s5 wait for the window (or more company)
    batcher.flush()
    results = await asyncio.gather(*tasks)
    assert recorder.calls[1] == ("s4", "s5")
    for i, result in enumerate(results):
        assert_vectors(result, f"s{i}")


async def test_a_request_larger_than_a_batch_runs_whole(make_batcher: MakeBatcher) -> None:
    recorder = Recorder()
    batcher = make_batcher(recorder, max_batch_size=4)
    texts = [f"t{i}" for i in range(10)]
    result = await start(batcher, *texts)
    assert recorder.calls == [tuple(texts)]
    assert_vectors(result, *texts)


async def test_requests_arriving_while_the_engine_works_form_the_next_batch(make_batcher: MakeBatcher) -> None:
    recorder = Recorder(gate=threading.Event())
    batcher = make_batcher(recorder, window=0)
    first = start(batcher, "first")
    assert await asyncio.to_thread(recorder.started.wait, 10)
    later = [start(batcher, f"later{i}") for i in range(3)]
    await settle()
    assert batcher.waiting == 3
    recorder.gate.set()  # type: ignore[union-attr]
    results = await asyncio.gather(first, *later)
    assert recorder.calls == [("first",), ("later0", "later1", "later2")]
    assert_vectors(results[0], "first")
    for i, result in enumerate(results[1:]):
        assert_vectors(result, f"later{i}")


async def test_the_next_batch_goes_to_the_engine_before_the_last_ones_callers_resume(make_batcher: MakeBatcher) -> None:
    # Writing a batch's replies takes the event loop a while (one handler per caller); the engine must
    # not sit idle meanwhile, so the instance goes back, and the next batch out, before the callers wake.
    recorder = Recorder(gate=threading.Event())
    batcher = make_batcher(recorder, window=0)
    runs_seen_by_first: list[int] = []

    async def first_caller() -> EmbeddingResult:
        result = await batcher.embed(EmbeddingJob(inputs=("first",)))
        runs_seen_by_first.append(batcher.batches_run)
        return result

    first = asyncio.create_task(first_caller())
    assert await asyncio.to_thread(recorder.started.wait, 10)
    later = start(batcher, "later")
    await settle()
    recorder.gate.set()  # type: ignore[union-attr]
    await asyncio.gather(first, later)
    assert runs_seen_by_first == [2]
    assert recorder.calls == [("first",), ("later",)]


async def test_batch_size_one_disables_batching(make_batcher: MakeBatcher) -> None:
    recorder = Recorder()
    batcher = make_batcher(recorder, window=0, max_batch_size=1)
    results = await asyncio.gather(*(start(batcher, f"s{i}") for i in range(4)))
    assert recorder.calls == [("s0",), ("s1",), ("s2",), ("s3",)]
    for i, result in enumerate(results):
        assert_vectors(result, f"s{i}")


async def test_batches_run_on_several_instances_at_once(make_batcher: MakeBatcher) -> None:
    recorder = Recorder(gate=threading.Event())
    batcher = make_batcher(recorder, window=0, max_batch_size=2, max_instances=2)
    tasks = [start(batcher, f"s{i}") for i in range(4)]
    # both instances are held inside the engine at once: two batches are running concurrently
    await eventually(lambda: len(recorder.calls) == 2)
    assert sorted(recorder.calls) == [("s0", "s1"), ("s2", "s3")]
    recorder.gate.set()  # type: ignore[union-attr]
    for i, result in enumerate(await asyncio.gather(*tasks)):
        assert_vectors(result, f"s{i}")


# ---------------------------------------------------------------------------------------- departures


async def test_a_caller_that_leaves_before_its_batch_is_dropped(make_batcher: MakeBatcher) -> None:
    recorder = Recorder()
    batcher = make_batcher(recorder)
    a, b, c = start(batcher, "a"), start(batcher, "b"), start(batcher, "c")
    await settle()
    b.cancel()
    await settle()
    assert batcher.waiting == 2
    batcher.flush()
    ra, rc = await asyncio.gather(a, c)
    assert recorder.calls == [("a", "c")]
    assert_vectors(ra, "a")
    assert_vectors(rc, "c")
    assert b.cancelled()


async def test_a_caller_that_leaves_during_its_batch_does_not_disturb_the_others(make_batcher: MakeBatcher) -> None:
    recorder = Recorder(gate=threading.Event())
    batcher = make_batcher(recorder, window=0)
    a, b = start(batcher, "a"), start(batcher, "b")
    assert await asyncio.to_thread(recorder.started.wait, 10)
    a.cancel()
    recorder.gate.set()  # type: ignore[union-attr]
    assert_vectors(await b, "b")
    assert a.cancelled()
    assert recorder.calls == [("a", "b")]


# ------------------------------------------------------------------------------------------- failures


async def test_an_engine_error_reaches_every_caller_of_the_batch(make_batcher: MakeBatcher) -> None:
    recorder = Recorder(fail_on="boom")
    batcher = make_batcher(recorder)
    tasks = [start(batcher, "x"), start(batcher, "boom"), start(batcher, "y")]
    await settle()
    batcher.flush()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, EngineError) for r in results), results
    assert "the engine broke" in str(results[0].__cause__)  # chained; the message shows only the type
    # the broken instance was replaced: the next request is served
    assert_vectors(await _flushed(batcher, start(batcher, "after")), "after")


async def test_a_bad_request_in_a_merged_batch_fails_only_its_caller(make_batcher: MakeBatcher) -> None:
    recorder = Recorder(refuse="bad")
    batcher = make_batcher(recorder)
    good1, bad, good2 = start(batcher, "one"), start(batcher, "x", "bad"), start(batcher, "two")
    await settle()
    batcher.flush()
    results = await asyncio.gather(good1, bad, good2, return_exceptions=True)
    assert_vectors(results[0], "one")  # type: ignore[arg-type]
    assert_vectors(results[2], "two")  # type: ignore[arg-type]
    assert isinstance(results[1], InvalidRequest)
    assert results[1].message == "input[1] is refused"  # its own index, not the merged batch's
    assert recorder.calls[0] == ("one", "x", "bad", "two")


async def test_a_model_that_cannot_load_fails_every_waiting_caller(make_batcher: MakeBatcher) -> None:
    batcher = make_batcher(Recorder(), fail_on_load=True)
    tasks = [start(batcher, "a"), start(batcher, "b")]
    await settle()
    batcher.flush()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, ModelUnavailable) for r in results), results


async def test_callers_waiting_past_the_queue_timeout_all_get_it(make_batcher: MakeBatcher) -> None:
    recorder = Recorder(gate=threading.Event())
    batcher = make_batcher(recorder, window=0, queue_timeout=30)
    pool, clock = batcher.pool, batcher.pool.clock
    first = start(batcher, "first")
    assert await asyncio.to_thread(recorder.started.wait, 10)
    stuck = [start(batcher, "a"), start(batcher, "b")]  # the only instance is busy: they wait for it
    await eventually(lambda: batcher.waiting == 2)
    assert pool.waiting == 2  # the batcher's queue is the pool's: each request counts, not its one acquire
    clock.advance(31)  # type: ignore[attr-defined]
    pool.reap()
    results = await asyncio.gather(*stuck, return_exceptions=True)
    assert all(isinstance(r, QueueTimeout) for r in results), results
    recorder.gate.set()  # type: ignore[union-attr]
    assert_vectors(await first, "first")
    assert recorder.calls == [("first",)]


async def test_too_many_waiting_requests_get_429(make_batcher: MakeBatcher) -> None:
    batcher = make_batcher(Recorder(), max_waiting=2)
    tasks = [start(batcher, "a"), start(batcher, "b")]
    await settle()
    with pytest.raises(TooManyRequests):
        await batcher.embed(EmbeddingJob(inputs=("c",)))
    batcher.flush()
    await asyncio.gather(*tasks)


async def test_close_fails_the_waiting_and_refuses_new_requests(make_batcher: MakeBatcher) -> None:
    batcher = make_batcher(Recorder())
    waiting = start(batcher, "a")
    await settle()
    await batcher.close()
    with pytest.raises(ShuttingDown):
        await waiting
    with pytest.raises(ShuttingDown):
        await batcher.embed(EmbeddingJob(inputs=("b",)))


# ------------------------------------------------------------------------------------------ dimensions


async def test_dimensions_apply_per_caller_within_one_batch(make_batcher: MakeBatcher) -> None:
    recorder = Recorder()
    batcher = make_batcher(recorder)
    short, full = start(batcher, "a", dimensions=3), start(batcher, "a")
    await settle()
    batcher.flush()
    short_result, full_result = await asyncio.gather(short, full)
    assert recorder.calls == [("a", "a")]  # computed once, at full length
    assert np.asarray(short_result.vectors).shape == (1, 3)
    assert np.linalg.norm(short_result.vectors[0]) == pytest.approx(1.0, abs=1e-6)
    cut = expected("a")[:3]
    np.testing.assert_allclose(short_result.vectors[0], cut / np.linalg.norm(cut), rtol=1e-6)
    assert_vectors(full_result, "a")


async def test_too_many_dimensions_are_refused_and_then_refused_before_queueing(make_batcher: MakeBatcher) -> None:
    recorder = Recorder()
    batcher = make_batcher(recorder, window=0)
    with pytest.raises(InvalidRequest, match=f"{DIMS + 1}.*{DIMS} dimensions"):
        await batcher.embed(EmbeddingJob(inputs=("a",), dimensions=DIMS + 1))
    assert batcher.dimension == DIMS  # learnt from that first result
    with pytest.raises(InvalidRequest):
        await batcher.embed(EmbeddingJob(inputs=("b",), dimensions=DIMS + 1))
    assert recorder.calls == [("a",)]


def test_shorten_renormalises_and_leaves_zero_vectors_alone() -> None:
    vectors = np.array([[3.0, 4.0, 12.0], [0.0, 0.0, 5.0]])
    out = shorten(vectors, 2)
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])
    assert out.dtype == np.float32
    np.testing.assert_allclose(shorten(vectors, None), vectors)
    with pytest.raises(InvalidRequest):
        check_dimensions(4, 3)


async def _flushed(batcher: EmbeddingBatcher, pending: asyncio.Task[EmbeddingResult]) -> EmbeddingResult:
    await settle()
    batcher.flush()
    return await pending
