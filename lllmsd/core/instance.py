"""ModelInstance: one loaded copy of a model, its worker thread, its state and its cached context.

Concurrency rules:
- Every engine call (load, generate, embed, close) runs on the instance's single worker thread, so an
  engine object is never used by two threads and calls on one instance are serialised even if a
  consumer gives up early.
- State changes happen only through this class's methods, on the event loop thread.
- A streaming call hands events to the event loop through an asyncio.Queue fed with
  ``call_soon_threadsafe``; a consumer that stops (client gone, cancellation) sets the call's
  ``threading.Event``, which the engine checks between tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from lllmsd.core.clock import Clock
from lllmsd.core.jobs import (
    EMPTY_CONTEXT,
    ChatJob,
    CompletionJob,
    Context,
    EmbeddingJob,
    EmbeddingResult,
    GenerationEvent,
    Preload,
    TextDelta,
    ToolCallDelta,
    TranscriptionEvent,
    TranscriptionJob,
    Usage,
    context_after,
)
from lllmsd.engines.base import EmbeddingEngine, Engine, ModelFiles, TextEngine, TranscriptionEngine
from lllmsd.errors import EngineError, LllmsdError

log = logging.getLogger(__name__)
E = TypeVar("E", bound=Engine)


class InstanceState(str, enum.Enum):
    LOADING = "loading"
    IDLE = "idle"
    BUSY = "busy"
    ERROR = "error"
    CLOSED = "closed"


class _Done:
    pass


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = _Done()


class ModelInstance:
    """One engine object for one model. The pool owns instances; handlers only use acquired ones."""

    def __init__(
        self,
        model_id: str,
        config: Any,
        engine_class: type[Engine],
        clock: Clock,
        *,
        instance_id: str,
    ) -> None:
        self.model_id = model_id
        self.config = config
        self.engine_class = engine_class
        self.clock = clock
        self.id = instance_id
        self.state = InstanceState.LOADING
        self.context: Context = EMPTY_CONTEXT
        self.cached_tokens = 0
        self.created_at = clock.now()
        self.created_wall = clock.wall()
        self.last_used = self.created_at
        self.requests_served = 0
        self.error: str | None = None
        self._engine: Engine | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lllmsd-{instance_id}")

    def __repr__(self) -> str:
        return f"<ModelInstance {self.id} {self.model_id} {self.state.value}>"

    # ------------------------------------------------------------------------------------- lifecycle

    async def load(self, files: ModelFiles, preload: Preload | None) -> None:
        """Construct the engine (and evaluate the preload) on the worker thread."""

        def work() -> int:
            engine = self._engine = self.engine_class(self.config, files)
            if preload is not None and (preload.messages or preload.prefix) and isinstance(engine, TextEngine):
                return int(engine.preload(preload))
            return 0

        try:
            cached = await self._in_worker(work)
        except BaseException as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = InstanceState.ERROR
            raise
        if preload is not None and preload.messages:
            self.context = Context.of_messages(preload.messages)
        elif preload is not None and preload.prefix:
            self.context = Context.of_text(preload.prefix)
        self.cached_tokens = cached
        self.state = InstanceState.IDLE
        self.last_used = self.clock.now()

    async def dispose(self) -> None:
        """Free the engine on its thread, then the thread. Safe to call in any state, more than once."""
        if self.state is InstanceState.CLOSED:
            return
        self.state = InstanceState.CLOSED
        engine, self._engine = self._engine, None
        try:
            if engine is not None:
                await self._in_worker(engine.close)
        except Exception:
            log.exception("instance %s: engine close failed", self.id)
        finally:
            self._executor.shutdown(wait=False)

    def reserve(self) -> None:
        assert self.state is InstanceState.IDLE, self.state
        self.state = InstanceState.BUSY

    def release(self) -> None:
        """Back to IDLE after a request, unless the engine failed (ERROR) or it was disposed."""
        if self.state is InstanceState.BUSY:
            self.state = InstanceState.IDLE
        self.last_used = self.clock.now()
        self.requests_served += 1

    def unreserve(self) -> None:
        """Undo a reservation that was never used (the waiter left in the same instant)."""
        if self.state is InstanceState.BUSY:
            self.state = InstanceState.IDLE

    def reset_context(self) -> None:
        """Forget the routing hint (the LRU instance taken for another conversation)."""
        self.context = EMPTY_CONTEXT

    def mark_failed(self, exc: BaseException) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        if self.state is not InstanceState.CLOSED:
            self.state = InstanceState.ERROR

    # ------------------------------------------------------------------------------------------ work

    async def generate(self, job: ChatJob | CompletionJob) -> AsyncIterator[GenerationEvent]:
        """Run chat or completion; yields events; updates the cached context when it completes."""
        engine = self._loaded(TextEngine)
        method = engine.chat if isinstance(job, ChatJob) else engine.complete
        first_choice: list[str] = []
        tool_seen = False
        usage: Usage | None = None
        self.context = job.context()  # whatever happens next, the prompt was evaluated
        async with contextlib.aclosing(self._stream(method, job)) as events:
            async for event in events:
                if isinstance(event, TextDelta) and event.choice == 0:
                    first_choice.append(event.text)
                elif isinstance(event, ToolCallDelta):
                    tool_seen = True
                elif isinstance(event, Usage):
                    usage = event
                yield event
        if usage is not None:
            self.cached_tokens = usage.prompt_tokens + usage.completion_tokens
        if not tool_seen and getattr(job, "n", 1) == 1 and not getattr(job, "echo", False):
            self.context = context_after(job, "".join(first_choice))

    async def embed(self, job: EmbeddingJob) -> EmbeddingResult:
        return await self._in_worker(self._loaded(EmbeddingEngine).embed, job, engine_call=True)

    async def transcribe(self, job: TranscriptionJob) -> AsyncIterator[TranscriptionEvent]:
        async with contextlib.aclosing(self._stream(self._loaded(TranscriptionEngine).transcribe, job)) as events:
            async for event in events:
                yield event

    def _loaded(self, capability: type[E]) -> E:
        """The engine, as the capability a job needs (admission only sends jobs the engine serves)."""
        engine = self._engine
        if not isinstance(engine, capability):
            raise EngineError(f"instance {self.id} has no loaded {capability.__name__}")
        return engine

    async def _in_worker(self, fn: Callable[..., Any], *args: Any, engine_call: bool = False) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except LllmsdError:
            raise
        except Exception as exc:
            if not engine_call:
                raise
            self.mark_failed(exc)
            raise self._engine_error(exc) from exc

    async def _stream(self, method: Callable[..., Iterator[Any]], job: Any) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()

        def put(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening any more
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                for event in method(job, cancel):
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
                    self.mark_failed(item.exc)
                    raise self._engine_error(item.exc) from item.exc
                yield item
        finally:
            cancel.set()
            # The worker stops within one token now. Waiting for it keeps one call at a time on the
            # engine; the single-thread executor guarantees that even if this wait is itself cancelled.
            await asyncio.shield(future)

    def _engine_error(self, exc: BaseException) -> EngineError:
        """What the client is told: the exception's type only. Its text can hold paths, prompts of other
        requests or credentials an engine library put there, so it goes to the log (and GET /) only."""
        log.error("instance %s: the engine failed", self.id, exc_info=exc)
        return EngineError(f"the engine failed ({type(exc).__name__}); the daemon logged the details")

    # ---------------------------------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        now = self.clock.now()
        return {
            "id": self.id,
            "model": self.model_id,
            "state": self.state.value,
            "context_tokens": self.cached_tokens,
            "created": round(self.created_wall),
            "last_used": round(self.created_wall + (self.last_used - self.created_at)),
            "age_seconds": round(now - self.created_at, 3),
            "idle_seconds": round(now - self.last_used, 3) if self.state is InstanceState.IDLE else 0,
            "requests_served": self.requests_served,
            "error": self.error,
        }


def instance_ids(prefix: str) -> Iterator[str]:
    """Short, unique, readable instance ids: the model id and a counter."""
    for n in itertools.count(1):
        yield f"{prefix}-{n}"
