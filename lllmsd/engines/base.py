"""The engine seam: what the core asks of a backend, and nothing more.

An engine class is constructed once per model instance; the constructor loads the weights (it may take
seconds) and ``close()`` frees them. Engines never see HTTP, OpenAI wire schemas or the pool.

Threading rule: every method of one engine object, the constructor included, is called from that
instance's own worker thread, one call at a time. An engine therefore needs no locks of its own; it must
check ``cancel`` between tokens and stop within one token once it is set.

Engines raise ``lllmsd.errors`` exceptions for problems with a request (``ContextLengthExceeded``,
``UnsupportedParameter``, ``InvalidRequest``); any other exception means the engine is in an unknown state
and the instance is replaced.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

from lllmsd.core.tasks import (
    ChatTask,
    CompletionTask,
    EmbeddingResult,
    EmbeddingTask,
    GenerationEvent,
    Preload,
    TranscriptionEvent,
    TranscriptionTask,
)

Task = ChatTask | CompletionTask | EmbeddingTask | TranscriptionTask

if TYPE_CHECKING:
    from lllmsd.config import ModelBase


@dataclass(frozen=True, slots=True)
class ModelFiles:
    """Where the store put a model's weights: one file (GGUF) or a folder. ``None`` for the fake engine."""

    path: Path | None


@runtime_checkable
class Engine(Protocol):
    name: ClassVar[str]

    def __init__(self, config: ModelBase, files: ModelFiles) -> None: ...

    @classmethod
    def check_task(cls, config: ModelBase, task: Task) -> None:
        """Raise UnsupportedParameter / InvalidRequest for what this engine cannot honour.

        Called on the event loop before the request queues, so it must be cheap and touch no weights:
        a request the engine cannot serve is refused at once, never after waiting for an instance.
        """
        ...

    def close(self) -> None: ...


@runtime_checkable
class TextEngine(Engine, Protocol):
    """Chat and completions. Each call yields TextDelta/ToolCallDelta events, one ChoiceEnd per choice,
    and a Usage event last."""

    def chat(self, task: ChatTask, cancel: threading.Event) -> Iterator[GenerationEvent]: ...

    def complete(self, task: CompletionTask, cancel: threading.Event) -> Iterator[GenerationEvent]: ...

    def preload(self, preload: Preload) -> int:
        """Evaluate the preload context; return how many tokens are now cached."""
        ...


@runtime_checkable
class EmbeddingEngine(Engine, Protocol):
    def embed(self, task: EmbeddingTask) -> EmbeddingResult: ...


@runtime_checkable
class TranscriptionEngine(Engine, Protocol):
    """Yields one TranscriptInfo first, then the segments as they are decoded."""

    def transcribe(self, task: TranscriptionTask, cancel: threading.Event) -> Iterator[TranscriptionEvent]: ...
