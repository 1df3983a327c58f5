"""ModelInstance: one loaded copy of a model, where its engine runs, its state and its cached context.

The engine runs in a host (core/hosts.py): a worker process of its own by default, so a crash in an
engine's C code costs this instance only, or a thread of the daemon (``isolation: thread``). The instance
does not care which: it sends jobs to the host and tracks what the pool needs to know.

Concurrency rules:
- The pool hands an instance to one request at a time, or to up to ``slots`` at once for a model that
  serves several requests on one instance (llama-cpp's ``slots``: each on a sequence of its own in the
  engine); ``active`` counts them, and the instance is BUSY while any runs.
- ``held`` is what the daemon knows of the conversations the engine holds in its cache, up to ``slots`` of
  them, for the pool's routing: a hint only (the engine itself picks the slot whose cache shares the
  longest prefix, and may evict another than the oldest).
- State changes happen only through this class's methods, on the event loop thread.
- A consumer that stops reading a stream (client gone, cancellation) closes it, which cancels the
  engine's call: it stops within one token, or its worker is killed after ``cancel_grace`` seconds and
  the instance is marked failed (the pool replaces it).
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from typing import Any

from lllmsd.core.clock import Clock
from lllmsd.core.deadline import Deadline
from lllmsd.core.hosts import EngineHost, ThreadHost
from lllmsd.core.jobs import (
    ChatJob,
    CompletionJob,
    Context,
    EmbeddingJob,
    EmbeddingResult,
    GenerationEvent,
    Job,
    Preload,
    RerankJob,
    RerankResult,
    SpeechAudio,
    SpeechJob,
    TextDelta,
    ToolCallDelta,
    TranscriptionEvent,
    TranscriptionJob,
    Usage,
    context_after,
)
from lllmsd.core.worker.process import WorkerProcess
from lllmsd.engines.base import Engine, ModelFiles
from lllmsd.errors import EngineError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Held:
    """One conversation an instance's engine holds in its cache, as far as the daemon knows: the context of
    its last request, and the client session (X-Session-Id) that came with it, if any."""

    context: Context
    session: str | None = None

    def continued_by(self, wanted: Context) -> bool:
        """Whether ``wanted`` continues this conversation to its end (not merely shares a prefix with it)."""
        return not self.context.empty and self.context.match_length(wanted) == len(self.context)


class InstanceState(str, enum.Enum):
    LOADING = "loading"
    IDLE = "idle"
    BUSY = "busy"
    ERROR = "error"
    CLOSED = "closed"


def engine_target(engine_class: type[Engine]) -> str | None:
    """``module:Class`` for a class a fresh interpreter can import by name; None for one built at run
    time (a test's subclass inside a function), which can only run on a thread."""
    if "<locals>" in engine_class.__qualname__:
        return None
    return f"{engine_class.__module__}:{engine_class.__qualname__}"


def isolation_of(config: Any, engine_class: type[Engine]) -> str:
    """Where a model's engine runs: the config's ``isolation``, else the engine's own default."""
    wanted = getattr(config, "isolation", None) or engine_class.isolation
    if wanted == "process" and engine_target(engine_class) is None:
        return "thread"
    return wanted


class ModelInstance:
    """One engine for one model. The pool owns instances; handlers only use acquired ones."""

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
        self.held: list[Held] = []  # at most ``slots``, the most recently used last
        self.cached_tokens = 0
        self.created_at = clock.now()
        self.created_wall = clock.wall()
        self.last_used = self.created_at
        self.requests_served = 0
        self.slots: int = getattr(config, "slots", 1)  # requests it serves at once (llama-cpp and fake configs)
        self.active = 0  # requests it is serving now
        self.error: str | None = None
        # what the engine reports about where it runs (Engine.placement), and the memory the budget holds
        self.placement: dict[str, Any] | None = None
        self.memory_estimate: int | None = None
        self.estimate_source: str | None = None
        self.waiting_for_memory = False
        self.isolation = isolation_of(config, engine_class)
        target = engine_target(engine_class)
        self.host: EngineHost
        if self.isolation == "process" and target is not None:
            self.host = WorkerProcess(instance_id, target, cancel_grace=config.cancel_grace)
        else:
            self.host = ThreadHost(instance_id, engine_class, concurrency=self.slots)

    def __repr__(self) -> str:
        return f"<ModelInstance {self.id} {self.model_id} {self.state.value}>"

    # ------------------------------------------------------------------------------------- lifecycle

    async def load(self, files: ModelFiles, preload: Preload | None) -> None:
        """Build the engine in its host (and evaluate the preload)."""
        try:
            cached = await self.host.load(self.config, files, preload)
        except BaseException as exc:
            self.error = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
            self.state = InstanceState.ERROR
            raise
        if preload is not None and preload.messages:
            self.hold(Context.of_messages(preload.messages))
        elif preload is not None and preload.prefix:
            self.hold(Context.of_text(preload.prefix))
        self.cached_tokens = cached
        await self.describe()  # before it is IDLE: nothing else can be running on it yet
        self.state = InstanceState.IDLE
        self.last_used = self.clock.now()

    async def describe(self) -> dict[str, Any]:
        """Ask the loaded engine where it runs and what it holds (kept for ``status``). A failure to
        report is logged, never a failed instance."""
        try:
            self.placement = dict(await self.host.call("placement", None, Deadline.after(30, self.model_id)))
        except Exception as exc:
            log.warning("instance %s: no placement report: %s", self.id, exc)
            self.placement = {}
        return self.placement

    async def dispose(self, grace: float | None = None) -> None:
        """Free the engine (a worker that does not exit within ``grace`` seconds, default the model's
        ``cancel_grace``, is killed). Safe to call in any state, more than once."""
        if self.state is InstanceState.CLOSED:
            return
        self.state = InstanceState.CLOSED
        try:
            await self.host.close(self.config.cancel_grace if grace is None else grace)
        except Exception:
            log.exception("instance %s: closing its engine failed", self.id)

    @property
    def has_free_slot(self) -> bool:
        """Whether the pool may hand it another request now: idle, or busy with fewer than ``slots``."""
        if self.state is InstanceState.IDLE:
            return True
        return self.state is InstanceState.BUSY and self.active < self.slots

    def reserve(self) -> None:
        assert self.has_free_slot, (self.state, self.active)
        self.state = InstanceState.BUSY
        self.active += 1

    def release(self) -> None:
        """One request ended: back to IDLE once none runs, unless the engine failed (ERROR) or it was
        disposed."""
        if self.host.dead is not None:
            self.mark_failed(EngineError(f"its worker process {self.host.dead}"))
        self._end_request()
        self.last_used = self.clock.now()
        self.requests_served += 1

    def unreserve(self) -> None:
        """Undo a reservation that was never used (the waiter left in the same instant)."""
        self._end_request()

    def _end_request(self) -> None:
        self.active = max(0, self.active - 1)
        if self.state is InstanceState.BUSY and self.active == 0:
            self.state = InstanceState.IDLE

    # ------------------------------------------------------------------------------ held conversations

    @property
    def session(self) -> str | None:
        """The client session of the conversation it served last, if that request sent one."""
        return self.held[-1].session if self.held else None

    def holds_session(self, session: str) -> bool:
        return any(held.session == session for held in self.held)

    def match_length(self, wanted: Context, *, whole: bool = False) -> int:
        """The longest prefix ``wanted`` shares with a conversation held here; with ``whole``, only
        conversations that ``wanted`` continues to their end count (another conversation is not taken)."""
        lengths = (held.context.match_length(wanted) for held in self.held if not whole or held.continued_by(wanted))
        return max(lengths, default=0)

    @property
    def has_room(self) -> bool:
        """Whether it can take a new conversation without pushing out one it holds."""
        return sum(1 for held in self.held if not held.context.empty) < self.slots

    def hold(self, context: Context, session: str | None = None) -> Held:
        """Note that a request's conversation is in the engine's cache now: as the conversation of its
        session, or the one it continues, if held, else as a new one, pushing out the least recently used
        beyond ``slots``. Returns its entry, which the request updates when it ends."""
        own = (h for h in self.held if session is not None and h.session == session)
        continued = (h for h in self.held if h.continued_by(context))
        held = next(own, None) or next(continued, None)
        if held is None:
            held = Held(context)
        else:
            self.held.remove(held)
        held.context = context
        held.session = session if session is not None else held.session
        self.held.append(held)
        del self.held[: -self.slots]
        return held

    def forget_oldest(self) -> None:
        """Drop the least recently used conversation (the pool gives its slot to another one)."""
        if self.held:
            del self.held[0]

    def mark_failed(self, exc: BaseException) -> None:
        self.error = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
        if self.state is not InstanceState.CLOSED:
            self.state = InstanceState.ERROR

    # ------------------------------------------------------------------------------------------ work

    async def generate(
        self, job: ChatJob | CompletionJob, session: str | None = None
    ) -> AsyncIterator[GenerationEvent]:
        """Run chat or completion; yields events; updates the held conversation when it completes."""
        method = "chat" if isinstance(job, ChatJob) else "complete"
        budget = self._budget()
        # the engine ends generation itself at the deadline ("length"); the host steps in only if it cannot
        job = replace(job, sampling=replace(job.sampling, deadline=budget.at))
        first_choice: list[str] = []
        tool_seen = False
        usage: Usage | None = None
        held = self.hold(job.context(), session)  # whatever happens next, the prompt was evaluated
        async with contextlib.aclosing(self._stream(method, job, budget.later(self.config.cancel_grace))) as events:
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
            held.context = context_after(job, "".join(first_choice))

    async def embed(self, job: EmbeddingJob) -> EmbeddingResult:
        try:
            result: EmbeddingResult = await self.host.call("embed", job, self._budget())
        except EngineError as exc:
            self.mark_failed(exc)
            raise
        return result

    async def rerank(self, job: RerankJob) -> RerankResult:
        try:
            result: RerankResult = await self.host.call("rerank", job, self._budget())
        except EngineError as exc:
            self.mark_failed(exc)
            raise
        return result

    async def transcribe(self, job: TranscriptionJob) -> AsyncIterator[TranscriptionEvent]:
        async with contextlib.aclosing(self._stream("transcribe", job, self._budget())) as events:
            async for event in events:
                yield event

    async def speak(self, job: SpeechJob) -> AsyncIterator[SpeechAudio]:
        """The job's audio file, piece by piece as its sentences are synthesized and encoded."""
        async with contextlib.aclosing(self._stream("speak", job, self._budget())) as events:
            async for event in events:
                yield event

    def _budget(self) -> Deadline:
        return Deadline.after(self.config.request_seconds(), self.model_id)

    async def _stream(self, method: str, job: Job, deadline: Deadline) -> AsyncIterator[Any]:
        try:
            async with contextlib.aclosing(self.host.stream(method, job, deadline)) as events:
                async for event in events:
                    yield event
        except EngineError as exc:  # the engine failed or its worker died: this instance is replaced
            self.mark_failed(exc)
            raise

    # ---------------------------------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        now = self.clock.now()
        return {
            "id": self.id,
            "model": self.model_id,
            "state": self.state.value,
            "isolation": self.isolation,
            "context_tokens": self.cached_tokens,
            "context_size": self.host.context_size or self.config.context_size,
            "created": round(self.created_wall),
            "last_used": round(self.created_wall + (self.last_used - self.created_at)),
            "age_seconds": round(now - self.created_at, 3),
            "idle_seconds": round(now - self.last_used, 3) if self.state is InstanceState.IDLE else 0,
            "requests_served": self.requests_served,
            "slots": self.slots,
            "active_requests": self.active,
            "error": self.error,
            "worker": self.host.memory(),
            "placement": self.placement,
            "memory_estimate_bytes": self.memory_estimate,
            "memory_estimate_source": self.estimate_source,
            "waiting_for_memory": self.waiting_for_memory,
        }


def instance_ids(prefix: str) -> Iterator[str]:
    """Short, unique, readable instance ids: the model id and a counter."""
    for n in itertools.count(1):
        yield f"{prefix}-{n}"
