"""Where an instance's engine runs: in a worker process of its own (``WorkerProcess``, the default for
real engines) or on a thread of the daemon (``ThreadHost``: the FakeEngine and engines a test builds at
run time, which another process could not import).

Both hosts run one call at a time (or up to the engine's ``concurrency``, for an engine that serves several
requests at once: llama-cpp with ``slots``) and have the same shape, so ModelInstance does not care which it has:
- ``load(config, files, preload)`` builds the engine and returns the tokens the preload cached;
- ``stream(method, job, deadline)`` yields a streaming method's events; closing it early cancels the
  call (the engine stops within one token); at the deadline (core/deadline.py) the call is cancelled
  and TimeBudgetExceeded raised;
- ``call(method, job, deadline)`` returns a non-streaming method's result, or raises at the deadline;
- ``close(grace)`` frees the engine; ``kill()`` ends a worker at once (a thread cannot be killed);
- ``dead`` says why the host can no longer serve (None while it can); ``memory()`` its process's RSS/PSS.

Errors: an ``LllmsdError`` is a problem with the request and leaves the host usable; any other failure
comes out as ``EngineError`` and the instance is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from lllmsd.core.deadline import TIME_UP, Deadline
from lllmsd.core.jobs import Job, Preload
from lllmsd.engines.base import Engine, ModelFiles, TextEngine
from lllmsd.errors import EngineError, LllmsdError

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineHost(Protocol):
    pid: int | None
    dead: str | None
    context_size: int | None  # the loaded engine's context window (Engine.context_size)

    async def load(self, config: Any, files: ModelFiles, preload: Preload | None) -> int: ...

    def stream(self, method: str, job: Job, deadline: Deadline) -> AsyncIterator[Any]: ...

    async def call(self, method: str, job: Job, deadline: Deadline) -> Any: ...

    async def close(self, grace: float) -> None: ...

    def kill(self) -> None: ...

    def memory(self) -> dict[str, int] | None: ...


def closing_if_closable(events: Any) -> contextlib.AbstractContextManager[Any]:
    """A context that closes ``events`` on exit if it can be closed (a generator), so an engine's call that
    stops early runs its cleanup at once, not when the generator is collected."""
    return contextlib.closing(events) if hasattr(events, "close") else contextlib.nullcontext(events)


class _Done:
    pass


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = _Done()


class ThreadHost:
    """The engine on a worker thread of the daemon. Concurrency rule: every engine call, the constructor
    included, runs on that thread, so the engine is never used by two threads; an engine of ``concurrency``
    N (it said it serves N requests at once) gets N threads."""

    def __init__(self, instance_id: str, engine_class: type[Engine], concurrency: int = 1) -> None:
        self.instance_id = instance_id
        self.engine_class = engine_class
        self.engine: Engine | None = None
        self.pid: int | None = None
        self.dead: str | None = None
        self.context_size: int | None = None
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"lllmsd-{instance_id}")

    async def load(self, config: Any, files: ModelFiles, preload: Preload | None) -> int:
        def work() -> int:
            engine = self.engine = self.engine_class(config, files)
            self.context_size = engine.context_size
            if preload is not None and (preload.messages or preload.prefix) and isinstance(engine, TextEngine):
                return int(engine.preload(preload))
            return 0

        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    async def close(self, grace: float) -> None:
        engine, self.engine = self.engine, None
        try:
            if engine is not None:
                await asyncio.get_running_loop().run_in_executor(self._executor, engine.close)
        except Exception:
            log.exception("instance %s: engine close failed", self.instance_id)
        finally:
            self._executor.shutdown(wait=False)

    def kill(self) -> None:
        """A thread cannot be killed: it is abandoned, and finishes its call when it can."""
        self.dead = "abandoned"

    def memory(self) -> dict[str, int] | None:
        return None  # it shares the daemon's memory

    async def call(self, method: str, job: Job, deadline: Deadline) -> Any:
        function = getattr(self._engine(), method)
        future = asyncio.get_running_loop().run_in_executor(self._executor, function, job)
        try:
            return await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline.at - time.monotonic()))
        except asyncio.TimeoutError:
            # a thread cannot be stopped: it is left to finish, and the instance is replaced
            self.dead = "abandoned after running past max_request_seconds"
            raise deadline.error() from None
        except LllmsdError:
            raise
        except Exception as exc:
            raise self._failure(exc) from exc

    async def stream(self, method: str, job: Job, deadline: Deadline) -> AsyncIterator[Any]:
        function = getattr(self._engine(), method)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()
        disarm = deadline.arm(queue)

        def put(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening any more
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                # closed at once when it stops early: an engine gives back what the call held (a slot)
                with closing_if_closable(function(job, cancel)) as events:
                    for event in events:
                        if cancel.is_set():
                            break
                        put(event)
            except BaseException as exc:
                put(_Failed(exc))
            else:
                put(_DONE)

        future = loop.run_in_executor(self._executor, work)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, _Failed):
                    if isinstance(item.exc, LllmsdError):
                        raise item.exc
                    raise self._failure(item.exc) from item.exc
                if item is TIME_UP:
                    # a thread cannot be stopped: if the engine does not see the cancel, it is left to
                    # finish on its own and the instance is replaced (dead), so nobody waits for it
                    self.dead = "abandoned after running past max_request_seconds"
                    raise deadline.error()
                yield item
        finally:
            disarm()
            cancel.set()
            # The engine stops within one token now. Waiting for it keeps one call at a time on the
            # engine; the single-thread executor guarantees that even if this wait is itself cancelled.
            if self.dead is None:
                await asyncio.shield(future)

    async def run(self, function: Callable[[], T]) -> T:
        """Run ``function`` on the engine's thread, between calls (tests that drive the engine itself)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function)

    def _engine(self) -> Engine:
        if self.engine is None:
            raise EngineError(f"instance {self.instance_id} has no loaded engine")
        return self.engine

    def _failure(self, exc: BaseException) -> EngineError:
        """What the client is told: the exception's type only. Its text can hold paths, prompts of other
        requests or credentials an engine library put there, so it goes to the log only."""
        log.error("instance %s: the engine failed", self.instance_id, exc_info=exc)
        return EngineError(f"the engine failed ({type(exc).__name__}); the daemon logged the details")
