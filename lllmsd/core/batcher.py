"""EmbeddingBatcher: concurrent embedding requests to one model, gathered into engine batches.

Embedding engines are far faster per input on a batch than on one input at a time (all-MiniLM on two
cores: ~2x for torch and ~1.6x for onnxruntime from batch 1 to 32), and clients send one sentence per
request. So requests do not take an instance each: they join the model's queue of pending requests and a
single *drainer* asyncio task turns that queue into batches:

  1. wait for the batch window (``batch_window_ms``) unless ``max_batch_size`` inputs already wait, so an
     idle model gathers a burst instead of starting on its first request;
  2. acquire an instance from the pool - while every instance is busy, more requests pile up and join;
  3. take the pending requests, in arrival order, up to ``max_batch_size`` inputs (a single larger
     request is never split: it runs whole), and run them as one ``EmbeddingJob`` on that instance;
  4. give the instance back, so the next batch starts on it at once, then slice the result back: every
     caller gets exactly its own vectors in its own order.

With ``max_instances > 1`` the drainer starts the next batch as soon as the previous one has taken its
requests, so batches run on several instances at once.

Failures: a request that leaves (client disconnect, cancellation) before its batch starts is dropped from
the queue; one that leaves later just has its vectors discarded. An engine error reaches every caller of
the batch. An invalid-request error (4xx) raised for a merged batch is one caller's fault, so the batch is
re-run one request at a time on the same instance and only the guilty caller gets the error. When no
instance can be had (load failure, queue timeout, shutdown) every waiting caller gets that error.

``dimensions`` (OpenAI's shortening) is applied per caller after the split: the engine computes full
vectors once for everyone, and each caller's are truncated and re-normalised to unit length.

Concurrency rules: everything here runs on the event loop thread; the queue is changed only by
synchronous code, so no lock is needed. Engine calls happen in the instances' worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from lllmsd.core.jobs import EmbeddingJob, EmbeddingResult
from lllmsd.errors import EngineError, InvalidRequest, LllmsdError, ShuttingDown, TooManyRequests

if TYPE_CHECKING:
    from lllmsd.core.instance import ModelInstance
    from lllmsd.core.pool import ModelPool

log = logging.getLogger(__name__)


def check_dimensions(dimensions: int | None, available: int) -> None:
    """Raise InvalidRequest if a request asks for longer vectors than the model makes."""
    if dimensions is not None and dimensions > available:
        raise InvalidRequest(
            f"dimensions is {dimensions}, but this model's embeddings have {available} dimensions",
            param="dimensions",
            code="invalid_value",
        )


def shorten(vectors: Any, dimensions: int | None) -> np.ndarray:
    """Vectors as a float32 matrix (one row per input), cut to ``dimensions`` and re-normalised to unit
    length: OpenAI's ``dimensions``. Raises InvalidRequest if the vectors are shorter than asked for."""
    matrix = np.asarray(vectors, dtype=np.float32)
    if matrix.size == 0:
        matrix = matrix.reshape(len(matrix), -1 if len(matrix) else 0)
    if dimensions is None:
        return matrix
    check_dimensions(dimensions, matrix.shape[1])
    cut = matrix[:, :dimensions]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return cut / np.where(norms == 0, 1, norms)


@dataclass(eq=False)
class _Pending:
    job: EmbeddingJob
    future: asyncio.Future[EmbeddingResult] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    @property
    def size(self) -> int:
        return len(self.job.inputs)

    @property
    def live(self) -> bool:
        return not self.future.done()


class EmbeddingBatcher:
    """The batching front of one embedding model's pool. Handlers call ``await batcher.embed(job)``."""

    def __init__(
        self,
        model_id: str,
        pool: ModelPool,
        *,
        window: float,
        max_batch_size: int,
        max_waiting: int,
    ) -> None:
        self.model_id = model_id
        self.window = window
        self.max_batch_size = max_batch_size
        self.max_waiting = max(max_waiting, 1)  # a lone request always gets in: it waits only for the window
        self.pool = pool
        self._pending: deque[_Pending] = deque()
        self._wake = asyncio.Event()  # a full batch is waiting, or flush() was called
        self._drainer: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self._closing = False
        self.dimension: int | None = None  # the model's vector length, learnt from its first result
        self.batches_run = 0  # for status and tests: engine calls made
        self._names = itertools.count(1)

    # -------------------------------------------------------------------------------------- public

    async def embed(self, job: EmbeddingJob) -> EmbeddingResult:
        """This request's vectors (float32 rows, ``dimensions`` applied) and token counts."""
        if self._closing:
            raise ShuttingDown(f"the daemon is shutting down; '{self.model_id}' takes no more requests")
        if self.dimension is not None:
            check_dimensions(job.dimensions, self.dimension)  # refuse before queueing, not after the work
        if self.waiting >= self.max_waiting:
            raise TooManyRequests(
                f"too many requests are waiting for '{self.model_id}' ({self.max_waiting} at most); retry later"
            )
        pending = _Pending(replace(job, dimensions=None))
        self._pending.append(pending)
        if self.queued_inputs >= self.max_batch_size:
            self._wake.set()
        self._ensure_drainer()
        try:
            result = await pending.future
        except asyncio.CancelledError:
            # the caller left: leave the queue now, so no batch carries inputs nobody waits for
            with contextlib.suppress(ValueError):
                self._pending.remove(pending)
            raise
        return self._finish(result, job.dimensions)

    def flush(self) -> None:
        """End the current batch window now (tests drive the window with this instead of sleeping)."""
        self._wake.set()

    @property
    def waiting(self) -> int:
        """Requests queued and not yet taken into a batch."""
        return sum(1 for p in self._pending if p.live)

    @property
    def queued_inputs(self) -> int:
        return sum(p.size for p in self._pending if p.live)

    async def close(self) -> None:
        """Refuse new requests, fail the queued ones, and stop the drainer and any batch still running.
        The runtime calls this after the pool has closed, so running batches had their grace period."""
        self._closing = True
        self._fail(self._pending, ShuttingDown(f"the daemon is shutting down; '{self.model_id}' was stopped"))
        self._pending.clear()
        tasks = [t for t in (self._drainer, *self._batches) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def status(self) -> dict[str, Any]:
        return {"waiting": self.waiting, "batches_run": self.batches_run, "dimension": self.dimension}

    # ------------------------------------------------------------------------------------- drainer

    def _ensure_drainer(self) -> None:
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain(), name=f"lllmsd-batcher-{self.model_id}")

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self.waiting:
            await self._gather()
            if not self.waiting:
                break
            taken: asyncio.Future[None] = loop.create_future()
            batch = asyncio.create_task(
                self._run_batch(taken), name=f"lllmsd-batch-{self.model_id}-{next(self._names)}"
            )
            self._batches.add(batch)
            batch.add_done_callback(self._batch_done)
            await asyncio.wait({taken, batch}, return_when=asyncio.FIRST_COMPLETED)
            if not taken.done():
                # no instance could be had (load failure, queue timeout, shutdown): every caller waiting
                # for one gets the reason now
                taken.cancel()
                self._fail(self._pending, _batch_error(batch))
                self._pending.clear()

    def _batch_done(self, batch: asyncio.Task[None]) -> None:
        self._batches.discard(batch)
        if not batch.cancelled() and batch.exception() is not None:
            # already reported to the callers by _drain (no instance) or _embed_batch; retrieved here so
            # asyncio does not warn about an exception nobody looked at
            log.debug("%s: batch ended with %r", self.model_id, batch.exception())

    async def _gather(self) -> None:
        """The batch window: return when it ends or when a full batch is waiting."""
        if self.queued_inputs >= self.max_batch_size:
            return
        self._wake.clear()
        if self.window <= 0:
            await asyncio.sleep(0)  # still let requests that arrived in the same loop turn join
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.window)

    async def _run_batch(self, taken: asyncio.Future[None]) -> None:
        answered: tuple[list[_Pending], EmbeddingResult] | None = None
        async with self.pool.acquire(counted=False) as instance:
            batch = self._take()
            taken.set_result(None)
            if batch:
                answered = await self._embed_batch(instance, batch)
        # The instance went back first: the next batch's task (waiting for it) runs before the callers
        # whose futures are set here, so the engine starts on it while the event loop writes these
        # replies, rather than idling until all of them are written.
        if answered is not None:
            self._distribute(*answered)

    def _take(self) -> list[_Pending]:
        """Pending requests in arrival order, up to max_batch_size inputs (at least one request)."""
        batch: list[_Pending] = []
        inputs = 0
        while self._pending:
            head = self._pending[0]
            if not head.live:
                self._pending.popleft()
                continue
            if batch and inputs + head.size > self.max_batch_size:
                break
            batch.append(self._pending.popleft())
            inputs += head.size
        return batch

    async def _embed_batch(
        self, instance: ModelInstance, batch: list[_Pending]
    ) -> tuple[list[_Pending], EmbeddingResult] | None:
        """The batch's result, for the caller to distribute; None when the callers have had their errors
        (or, after a client error, their answers one by one) already."""
        # a lone request runs as it came, so an engine's error names its inputs as its client did
        merged = (
            batch[0].job
            if len(batch) == 1
            else EmbeddingJob(inputs=tuple(itertools.chain.from_iterable(p.job.inputs for p in batch)))
        )
        try:
            self.batches_run += 1
            result = await instance.embed(merged)
            _check_result(result, len(merged.inputs))
        except asyncio.CancelledError:
            self._fail(batch, ShuttingDown(f"the daemon is shutting down; '{self.model_id}' was stopped"))
            raise
        except LllmsdError as exc:
            if exc.status < 500 and len(batch) > 1:  # a client error: find whose
                await self._one_by_one(instance, batch)
            else:
                self._fail(batch, exc)
            return None
        except Exception as exc:  # a bug below us must still reach every caller as a clear error
            log.exception("%s: embedding batch failed", self.model_id)
            self._fail(batch, EngineError(f"embedding failed ({type(exc).__name__}); the daemon logged the details"))
            return None
        return batch, result

    async def _one_by_one(self, instance: ModelInstance, batch: list[_Pending]) -> None:
        for index, pending in enumerate(batch):
            if not pending.live:
                continue
            try:
                self.batches_run += 1
                result = await instance.embed(pending.job)
                _check_result(result, pending.size)
            except LllmsdError as exc:
                pending.future.set_exception(exc)
                if exc.status >= 500:  # the instance is broken: the rest cannot run on it
                    self._fail(batch[index + 1 :], exc)
                    return
                continue
            pending.future.set_result(result)

    def _distribute(self, batch: list[_Pending], result: EmbeddingResult) -> None:
        offset = 0
        for pending in batch:
            end = offset + pending.size
            if pending.live:
                pending.future.set_result(
                    EmbeddingResult(vectors=result.vectors[offset:end], token_counts=result.token_counts[offset:end])
                )
            offset = end

    def _finish(self, result: EmbeddingResult, dimensions: int | None) -> EmbeddingResult:
        full = shorten(result.vectors, None)
        if full.shape[0] and self.dimension is None:
            self.dimension = int(full.shape[1])
        return EmbeddingResult(vectors=shorten(full, dimensions), token_counts=list(result.token_counts))

    @staticmethod
    def _fail(pendings: Iterable[_Pending], error: BaseException) -> None:
        for pending in pendings:
            if pending.live:
                pending.future.set_exception(error)


def _check_result(result: EmbeddingResult, inputs: int) -> None:
    if len(result.vectors) != inputs or len(result.token_counts) != inputs:
        raise EngineError(
            f"the engine returned {len(result.vectors)} vectors and {len(result.token_counts)} token counts "
            f"for {inputs} inputs"
        )


def _batch_error(batch: asyncio.Task[None]) -> BaseException:
    if batch.cancelled():
        return ShuttingDown("the embedding batch was cancelled: the daemon is shutting down")
    error = batch.exception()
    if isinstance(error, LllmsdError):
        return error
    log.error("embedding batch failed before it ran", exc_info=error)
    return EngineError(f"embedding failed ({type(error).__name__}); the daemon logged the details")


__all__: Sequence[str] = ("EmbeddingBatcher", "check_dimensions", "shorten")
