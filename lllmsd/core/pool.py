"""ModelPool: the instances of one model, who gets which, and when they come and go.

A request takes an instance with ``async with pool.acquire(job.context()) as instance:`` (an embedding
model's requests go through ``pool.embed(job)``: the pool's batcher merges them into engine batches, and
its queue is the pool's, in ``waiting`` and ``GET /``; rerank requests go through ``pool.rerank(job)``).
A request is handed an instance and a global concurrency slot together (core/limit.py). The choice,
for the request at the head of the queue, is, in order:
  0. with a session key (the X-Session-Id header), the idle instance that holds that session's
     conversation (``ModelInstance.held``): it holds it even when the history was cut or edited and no
     longer shares a prefix (an instance whose cache that conversation has left, for another one, does not);
  1. the idle instance holding the conversation that shares the longest prefix with the request's. With a
     session key, only a conversation that the request continues to its end: sessions often share a
     system prompt, and that prefix alone must not make a session evict another conversation that is still
     going on (the least recently used one goes first, in step 4);
  2. an idle instance with room for another conversation (fresh, or holding fewer than its slots);
  3. a new instance, if fewer than ``max_instances`` exist (the request waits for it to load);
  4. the least recently used idle instance, where its least recently used conversation makes room;
  5. otherwise, wait.
A model whose instances serve several requests at once (llama-cpp's ``slots``) hands out an instance
while it has a free slot: steps 0-2 consider busy instances with a free slot as well as idle ones (in
step 2 an idle one first), and before step 3 a busy instance with a free slot (the one serving fewest) is
shared rather than a new one loaded: filling the slots of a loaded instance costs nothing, a load costs
seconds. Such an instance holds up to ``slots`` conversations, one per slot, and steps 0 and 1 look at all.
Waiters are served strictly first in, first out. Instances idle for ``ttl`` seconds are disposed (never
below ``min_instances``) and waiters past ``queue_timeout`` are failed, both by ``reap()``, which the
runtime calls periodically and tests call after moving an injected clock. After a failed load the pool
backs off (2, 4, 8, ... 60 s): no load starts meanwhile, and a request that nothing could serve gets 503
at once with the last load error and a Retry-After. (A failed download only delays ``min_instances``
refills: the next request starts it afresh.)

Memory (core/budget.py): a new instance loads only once the daemon's memory budget has room for its
estimate (core/estimate.py); until then it stays LOADING and the requests wait in the queue as for a
busy model. Making room may dispose the least recently used idle instances of other models: the budget
calls ``evict``. A load that waits for room and that no waiting request needs any more is dropped.
When step 3 above would have to wait for room, step 4 (reuse an idle instance) is taken instead.

Concurrency rules: everything here runs on the event loop thread and never blocks; loading and
disposing happen in the instances' worker threads. Pool bookkeeping (instances, waiters) is changed only
by synchronous methods, so no lock is needed: there is no ``await`` between a decision and its effect.
Release happens in ``acquire``'s ``finally``, on success, engine error, cancellation and disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lllmsd.core.batcher import EmbeddingBatcher
from lllmsd.core.budget import MemoryBudget
from lllmsd.core.clock import Clock
from lllmsd.core.estimate import estimate_instance
from lllmsd.core.instance import InstanceState, ModelInstance, instance_ids
from lllmsd.core.jobs import (
    EMPTY_CONTEXT,
    Context,
    EmbeddingJob,
    EmbeddingResult,
    ModelTask,
    Preload,
    RerankJob,
    RerankResult,
)
from lllmsd.core.limit import ConcurrencyLimit
from lllmsd.core.rerank import rerank_by_cosine
from lllmsd.engines.base import Engine, ModelFiles
from lllmsd.errors import (
    EngineError,
    LllmsdError,
    ModelUnavailable,
    QueueTimeout,
    ShuttingDown,
    TooManyRequests,
)

log = logging.getLogger(__name__)

FilesProvider = Callable[[], Awaitable[ModelFiles]]
MAX_LOAD_BACKOFF = 60.0
DISPOSE_FLOOR = 0.5  # seconds an idle worker gets to exit by itself when the grace is spent
_LIVE = (InstanceState.LOADING, InstanceState.IDLE, InstanceState.BUSY)


@dataclass(eq=False)
class _Waiter:
    context: Context
    enqueued_at: float
    counted: bool = True  # False for the batcher's own acquires: its queued requests are counted instead
    session: str | None = None  # the client's session key: prefer the instance that holds its conversation
    future: asyncio.Future[ModelInstance] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class ModelPool:
    def __init__(
        self,
        model_id: str,
        config: Any,
        engine_class: type[Engine],
        *,
        files: FilesProvider,
        limiter: ConcurrencyLimit,
        clock: Clock,
        preload: Preload | None = None,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.model_id = model_id
        self.config = config
        self.engine_class = engine_class
        self.clock = clock
        self._files = files
        self._limiter = limiter
        self._preload = preload
        self._ids = instance_ids(model_id)
        self.instances: list[ModelInstance] = []
        self._waiters: deque[_Waiter] = deque()
        self._background: set[asyncio.Task[Any]] = set()
        self._disposals: set[asyncio.Task[Any]] = set()  # the background tasks that dispose instances
        self._closing = False
        self._load_failures = 0  # consecutive; reset by a successful load
        self._retry_at = 0.0  # no min-instance refill before this time after failures
        self._engine_retry_at = 0.0  # no load at all before this time after the engine failed to load
        self._preparing = 0  # loads waiting for the store (downloads): waiters do not time out meanwhile
        self._last_error: str | None = None
        self._idle_changed = asyncio.Event()
        self._budget = budget
        self._loads: dict[ModelInstance, asyncio.Task[Any]] = {}  # load tasks, to drop unneeded waits for room
        self._instance_size: int | None = None  # the last estimate of one instance (for step 3 vs 4)
        self._measured: int | None = None  # RSS of the first instance measured, for engines with no estimate
        self._notes_logged: set[str] = set()  # placement notes are warned about once per model
        self.batcher: EmbeddingBatcher | None = None
        if config.task is ModelTask.EMBEDDING:
            self.batcher = EmbeddingBatcher(
                model_id,
                self,
                window=config.batch_window_ms / 1000,
                max_batch_size=config.max_batch_size,
                max_waiting=config.max_waiting,
            )
        limiter.subscribe(self)
        if budget is not None:
            budget.subscribe(self)

    # --------------------------------------------------------------------------------------- public

    def start(self) -> None:
        """Begin loading the minimum instances in the background."""
        self._ensure_min()

    @contextlib.asynccontextmanager
    async def acquire(
        self, context: Context = EMPTY_CONTEXT, *, counted: bool = True, session: str | None = None
    ) -> AsyncIterator[ModelInstance]:
        """Hand out an instance (with a global concurrency slot) for one request; both are released
        whatever happens inside. ``counted=False`` is the batcher's: its requests are counted queued
        in ``waiting`` until a batch takes them, not the acquire that runs the batch. ``session`` is the
        client's session key, if it sent one (see the choice above)."""
        instance = await self._checkout(context, counted, session)
        try:
            yield instance
        finally:
            self._checkin(instance)

    async def embed(self, job: EmbeddingJob) -> EmbeddingResult:
        """An embedding model's way in: the job joins the batcher's queue (see core/batcher.py)."""
        if self.batcher is None:
            raise TypeError(f"'{self.model_id}' is not an embedding model")  # admission rules this out
        return await self.batcher.embed(job)

    async def rerank(self, job: RerankJob) -> RerankResult:
        """A rerank model's engine scores the job on one instance (it batches a long list itself); an
        embedding model answers by cosine through its batcher (core/rerank.py)."""
        if self.batcher is not None:
            return await rerank_by_cosine(self.batcher.embed, job)
        async with self.acquire() as instance:
            result = await instance.rerank(job)
        if len(result.scores) != len(job.documents):  # an engine bug must not reach clients as wrong indices
            raise EngineError(f"the engine returned {len(result.scores)} scores for {len(job.documents)} documents")
        return result

    def reap(self) -> None:
        """Dispose instances idle past their TTL, fail waiters past the queue timeout, refill the minimum."""
        now = self.clock.now()
        ttl = self.config.ttl
        if ttl >= 0:
            for instance in sorted(self._idle(), key=lambda i: i.last_used):
                if len(self.instances) <= self.config.min_instances:
                    break
                if now - instance.last_used >= ttl:
                    log.info("%s: instance %s idle for %.0fs, disposing", self.model_id, instance.id, ttl)
                    self._discard(instance)
        for waiter in list(self._waiters):
            if self._preparing:
                waiter.enqueued_at = now  # bytes still arriving: waiting for a download is not queueing
            elif now - waiter.enqueued_at >= self.config.queue_timeout and not waiter.future.done():
                self._waiters.remove(waiter)
                waiter.future.set_exception(
                    QueueTimeout(
                        f"no instance of '{self.model_id}' became free within "
                        f"{self.config.queue_timeout:g}s (queue_timeout)"
                    )
                )
        self._ensure_min()
        self.dispatch()  # loads that waited for memory for the requests that timed out are dropped

    async def close(self, grace: float) -> None:
        """Stop taking requests, let running ones finish for up to ``grace`` seconds, dispose everything."""
        self._closing = True
        loop = asyncio.get_running_loop()
        end = loop.time() + grace
        self._fail_waiters(ShuttingDown(f"the daemon is shutting down; '{self.model_id}' takes no more requests"))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._until_not_busy(), grace)
        if self.batcher is not None:  # after the grace: its running batches had their time
            await self.batcher.close()
        self._limiter.unsubscribe(self)
        for task in list(self._background):
            if task not in self._disposals:  # loads stop now; a disposal finishes (it kills what hangs)
                task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        instances, self.instances = self.instances, []
        # what is left of the grace (a moment at least, for an idle worker to exit on its own), then kill
        left = max(end - loop.time(), DISPOSE_FLOOR)
        await asyncio.gather(*(self._dispose(i, left) for i in instances), return_exceptions=True)
        if self._budget is not None:
            self._budget.unsubscribe(self)

    @property
    def waiting(self) -> int:
        """Requests queued for this model: waiting for an instance, or in the batcher's queue."""
        queued = sum(1 for w in self._waiters if w.counted and not w.future.done())
        return queued + (self.batcher.waiting if self.batcher is not None else 0)

    def oldest_waiter_since(self) -> float | None:
        return next((w.enqueued_at for w in self._waiters if not w.future.done()), None)

    @property
    def retry_in(self) -> float:
        """Seconds left of the back-off after the engine failed to load (0 when loads may start). A failed
        download does not count: the next request starts it afresh."""
        return max(0.0, self._engine_retry_at - self.clock.now())

    def status(self) -> dict[str, Any]:
        return {
            "instances": [i.status() for i in self.instances],
            "waiting": self.waiting,
            "min_instances": self.config.min_instances,
            "max_instances": self.config.max_instances,
            "last_error": self._last_error,
            **({"batches_run": self.batcher.batches_run} if self.batcher is not None else {}),
        }

    # ------------------------------------------------------------------------------------- checkout

    async def _checkout(self, context: Context, counted: bool, session: str | None = None) -> ModelInstance:
        if self._closing:
            raise ShuttingDown(f"the daemon is shutting down; '{self.model_id}' takes no more requests")
        self._refuse_while_backing_off()
        waiter = _Waiter(context=context, enqueued_at=self.clock.now(), counted=counted, session=session)
        self._waiters.append(waiter)
        self.dispatch()
        if not waiter.future.done() and counted and self.waiting > self.config.max_waiting:
            self._waiters.remove(waiter)
            waiter.future.cancel()
            raise TooManyRequests(
                f"too many requests are waiting for '{self.model_id}' ({self.config.max_waiting} at most); retry later",
                retry_after=1,
            )
        try:
            return await waiter.future
        except asyncio.CancelledError:
            # The client went away while waiting. If an instance was handed over in the same instant,
            # give it back; otherwise leave the queue now, not when the instance would have come.
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self._checkin(waiter.future.result(), served=False)
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                self.dispatch()
            raise

    def _refuse_while_backing_off(self) -> None:
        """After failed loads nothing starts a new load until the back-off ends: a request that no
        instance could serve gets the last load error now, not a load that fails again."""
        wait = self.retry_in
        if wait > 0 and not any(i.state in _LIVE for i in self.instances):
            raise ModelUnavailable(
                f"{self._last_error or f'model {self.model_id!r} failed to load'} "
                f"(the next load is tried in {wait:.0f}s)",
                retry_after=max(1, math.ceil(wait)),
            )

    def _checkin(self, instance: ModelInstance, *, served: bool = True) -> None:
        if served:
            instance.release()
        else:
            instance.unreserve()
        self._limiter.give_back()
        if instance.state is InstanceState.ERROR:
            log.warning("%s: instance %s failed (%s); replacing it", self.model_id, instance.id, instance.error)
            self._last_error = instance.error
            self._discard(instance)
        elif (
            self.config.ttl == 0
            and instance.state is InstanceState.IDLE  # not while other requests run on its slots
            and len(self.instances) > self.config.min_instances
            and not self._waiters
        ):
            self._discard(instance)
        self._idle_changed.set()
        self.dispatch()
        self._ensure_min()
        if self._budget is not None:
            self._budget.settle()  # an instance left idle may be what a waiting load can evict

    def dispatch(self) -> None:
        """Serve waiters in FIFO order, each with an idle instance and a global slot taken together;
        start loads for the waiters no existing instance will serve. The limiter calls this when a slot
        frees."""
        out_of_slots = False
        while self._waiters:
            waiter = self._waiters[0]
            if waiter.future.done():
                self._waiters.popleft()
                continue
            if not self._limiter.free:
                out_of_slots = True  # the limiter calls back when one frees
                break
            instance = self._choose(waiter.context, waiter.session)
            if instance is None:
                break
            self._waiters.popleft()
            self._limiter.take()
            instance.reserve()
            waiter.future.set_result(instance)
        waiters = sum(1 for w in self._waiters if not w.future.done())
        coming = sum(i.slots for i in self.instances if i.state is InstanceState.LOADING)
        if out_of_slots:  # idle instances will serve these once slots free: no need to load more
            coming += sum(i.slots - i.active for i in self._available())
        unserved = waiters - coming
        while unserved > 0 and self._can_grow():
            self._spawn()
            unserved -= 1
        self._drop_unneeded_loads(-unserved)

    def _choose(self, wanted: Context, session: str | None = None) -> ModelInstance | None:
        idle = list(self._available())  # idle, or (slots) busy with a free slot
        if not idle:
            return None
        if session is not None and (own := next((i for i in idle if i.holds_session(session)), None)):
            return own
        # with a session, keep other conversations: only one that this continues to its end counts
        matches = [(i.match_length(wanted, whole=session is not None), i) for i in idle]
        length, best = max(matches, key=lambda match: match[0], default=(0, None))
        if length > 0 and best is not None:
            return best
        fresh = [i for i in idle if _is_fresh(i)]
        if fresh:  # the least busy: an idle instance before a free slot of a busy one
            return min(fresh, key=lambda i: i.active)
        shared = [i for i in idle if i.state is InstanceState.BUSY]
        if shared:
            return min(shared, key=lambda i: i.active)
        if self._can_grow() and self._room_for_another():
            return None
        lru = min(idle, key=lambda i: i.last_used)
        lru.forget_oldest()
        return lru

    def _idle(self) -> Iterator[ModelInstance]:
        return (i for i in self.instances if i.state is InstanceState.IDLE)

    def _available(self) -> Iterator[ModelInstance]:
        """Instances that may take a request now: idle ones, and busy ones with a free slot."""
        return (i for i in self.instances if i.has_free_slot)

    def _can_grow(self) -> bool:
        return not self._closing and len(self.instances) < self.config.max_instances and self.retry_in <= 0

    def _room_for_another(self) -> bool:
        """Whether one more instance would load at once, with nothing evicted (unknown before the first
        estimate: then it is tried)."""
        size = self._instance_size
        return self._budget is None or size is None or self._budget.fits_now(size)

    # -------------------------------------------------------------------------------------- memory

    def evictable(self) -> list[ModelInstance]:
        """Idle instances the budget may dispose for another model's load, least recently used first:
        none while requests wait here (they take idle instances as soon as a slot frees), and never
        below ``min_instances``."""
        if self.waiting:
            return []
        spare = len(self.instances) - self.config.min_instances
        return sorted(self._idle(), key=lambda i: i.last_used)[: max(spare, 0)]

    def evict(self, instance: ModelInstance) -> None:
        log.info("%s: instance %s disposed to make room in the memory budget", self.model_id, instance.id)
        self._discard(instance)

    def _drop_unneeded_loads(self, surplus: int) -> None:
        """Cancel up to ``surplus`` loads still waiting for room (newest first) that no waiting request
        needs any more, above ``min_instances``."""
        if self._budget is None:
            return
        for instance in list(reversed(self.instances)):
            if surplus <= 0 or len(self.instances) <= self.config.min_instances:
                return
            task = self._loads.get(instance)
            if task is not None and instance.waiting_for_memory:
                log.info("%s: instance %s no longer needed; it stops waiting for memory", self.model_id, instance.id)
                self._forget(instance)
                task.cancel()
                surplus -= 1

    async def _reserve_memory(self, instance: ModelInstance, files: ModelFiles) -> None:
        """Until the budget holds room for this instance's estimate."""
        if self._budget is None:
            return
        size, source = await estimate_instance(self.config, self.engine_class, files, self._measured)
        self._instance_size = size
        instance.memory_estimate, instance.estimate_source = size, source
        instance.waiting_for_memory = True
        try:
            await self._budget.request(self, instance, size)
        finally:
            instance.waiting_for_memory = False

    def _loaded(self, instance: ModelInstance) -> None:
        """Log where the new instance runs and what it holds (warning once per model about what it could
        not honour), and measure it when its engine has no estimate of its own."""
        placement = instance.placement or {}
        for note in placement.get("notes", ()):
            if note not in self._notes_logged:
                self._notes_logged.add(note)
                log.warning("%s: %s", self.model_id, note)
        memory = instance.host.memory() or {}
        log.info(
            "%s: instance %s ready: %s; memory: estimate %s (%s), resident %s",
            self.model_id,
            instance.id,
            ", ".join(f"{k} {v}" for k, v in placement.items() if k not in ("notes", "buffers")),
            _mib(instance.memory_estimate),
            instance.estimate_source,
            _mib(memory.get("rss_bytes")),
        )
        if instance.estimate_source == "files" and memory.get("rss_bytes") and self._budget is not None:
            self._measured = memory["rss_bytes"]
            instance.memory_estimate, instance.estimate_source = self._measured, "measured"
            self._budget.resize(instance, self._measured)

    async def _dispose(self, instance: ModelInstance, grace: float | None = None) -> None:
        """Dispose ``instance``; its memory is the budget's again once its worker is gone."""
        try:
            await instance.dispose(grace)
        finally:
            if self._budget is not None:
                self._budget.release(instance)

    # ----------------------------------------------------------------------------- loading, disposing

    def _spawn(self) -> ModelInstance:
        instance = ModelInstance(self.model_id, self.config, self.engine_class, self.clock, instance_id=next(self._ids))
        self.instances.append(instance)
        task = self._in_background(self._load(instance))
        self._loads[instance] = task
        task.add_done_callback(lambda _: self._loads.pop(instance, None))
        return instance

    async def _load(self, instance: ModelInstance) -> None:
        engine_failed = False  # a failed download or verification: the store starts afresh next request
        try:
            self._preparing += 1
            try:
                files = await self._files()
            finally:
                self._preparing -= 1
            engine_failed = True  # past here, the same weights would fail the same way: back off
            await self._reserve_memory(instance, files)
            await instance.load(files, self._preload)
            self._loaded(instance)
        except asyncio.CancelledError:
            self._forget(instance)
            await self._dispose(instance)
            raise
        except Exception as exc:
            self._load_failed(instance, exc, engine_failed=engine_failed)
            # freed by a disposal of its own, which close() awaits and never cancels: freed here, a close()
            # that cancels this load would cut it short (a worker left running, its pipes never closed)
            self._discard(instance)
            return
        self._load_failures = 0
        self._engine_retry_at = 0.0
        self._last_error = None
        self.dispatch()
        if self._budget is not None:
            self._budget.settle()  # the new instance is idle: a waiting load may evict it

    def _load_failed(self, instance: ModelInstance, exc: Exception, *, engine_failed: bool) -> None:
        self._forget(instance)
        self._load_failures += 1
        self._retry_at = self.clock.now() + min(MAX_LOAD_BACKOFF, 2.0**self._load_failures)
        if engine_failed:  # the same weights would fail the same way: no load on demand before then either
            self._engine_retry_at = self._retry_at
        if isinstance(exc, LllmsdError) and exc.status >= 500:
            error: LllmsdError = exc
            log.error("%s: instance %s cannot load: %s", self.model_id, instance.id, exc.message)
        elif isinstance(exc, LllmsdError):
            # a fault in the model's own config that shows only at load (a chat format the weights lack):
            # the server's fault, not the waiting clients'
            error = ModelUnavailable(f"model '{self.model_id}' cannot load: {exc.message}")
            log.error("%s: instance %s cannot load: %s", self.model_id, instance.id, exc.message)
        else:
            error = ModelUnavailable(f"model '{self.model_id}' failed to load: {type(exc).__name__}: {exc}")
            log.error("%s: instance %s failed to load", self.model_id, instance.id, exc_info=exc)
        self._last_error = error.message
        # Nothing else can serve the waiters: tell them now instead of letting them time out.
        if not any(i.state in _LIVE for i in self.instances):
            self._fail_waiters(error)

    def _discard(self, instance: ModelInstance) -> None:
        self._forget(instance)
        self._disposals.add(self._in_background(self._dispose(instance)))

    def _forget(self, instance: ModelInstance) -> None:
        with contextlib.suppress(ValueError):
            self.instances.remove(instance)

    def _ensure_min(self) -> None:
        if self._closing or self.clock.now() < self._retry_at:
            return
        while len(self.instances) < self.config.min_instances:
            self._spawn()

    def _fail_waiters(self, error: BaseException) -> None:
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if not waiter.future.done():
                waiter.future.set_exception(error)

    def _in_background(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(self._disposals.discard)
        return task

    async def _until_not_busy(self) -> None:
        while any(i.state is InstanceState.BUSY for i in self.instances):
            self._idle_changed.clear()
            await self._idle_changed.wait()

    async def wait_idle(self) -> None:
        """Until no load or dispose is under way (tests, reload)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)


def _is_fresh(instance: ModelInstance) -> bool:
    """Whether an instance has room for a new conversation: never used, or holding fewer than its slots."""
    return instance.requests_served == 0 or instance.has_room


def _mib(size: int | None) -> str:
    return "unknown" if size is None else f"{size / 2**20:.0f} MiB"
