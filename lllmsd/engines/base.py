"""The engine seam: what the core asks of a backend, and what a backend declares about itself.

An engine class is constructed once per model instance; the constructor loads the weights (it may take
seconds) and ``close()`` frees them. Engines never see HTTP, OpenAI wire schemas or the pool.

What an engine can do is declared once, on its class, and everything else reads that declaration:
- ``serves``: the kinds of job it runs (chat, completion, embedding, transcription, speech, rerank), each one
  method of the matching base class below. The model tasks it can be configured for follow from them.
- ``features``: the optional parts of a job it honours (n, logprobs, tools, ...). Admission refuses a job
  that uses any other feature with a 400 naming the request parameter, before the request queues;
  ``GET /`` lists the declaration; the contract tests test each declared feature and the refusal of
  every other one.
- ``isolation``: where its instances run by default, a worker process or a daemon thread.
- ``config_problems``: what only this engine can judge about a model's options, at config load.
- ``check_job``: what only this engine can judge about one job (a grammar that does not compile, a
  language it does not know). It runs before the request queues: no weights, and cheap, or else
  ``heavy_check`` says so for that job and admission runs it off the event loop. It may return the job
  with what it built on the way (``compiled`` grammars), which is then the job that runs.

Threading rule: every method of one engine object, the constructor included, is called from that
instance's own worker thread, one call at a time. An engine therefore needs no locks of its own; it must
check ``cancel`` between tokens and stop within one token once it is set. The exception is an engine that
sets ``concurrency`` above 1 (llama-cpp with ``slots``): its generation methods are then called from up to
that many threads at once, and it guards what they share itself.

Engines raise ``lllmsd.errors`` exceptions for problems with a request (``ContextLengthExceeded``,
``UnsupportedParameter``, ``InvalidRequest``); any other exception means the engine is in an unknown state
and the instance is replaced.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from lllmsd.core.jobs import (
    ChatJob,
    CompletionJob,
    EmbeddingJob,
    EmbeddingResult,
    Feature,
    GenerationEvent,
    Job,
    JobKind,
    ModelTask,
    Preload,
    RerankJob,
    RerankResult,
    SpeechAudio,
    SpeechJob,
    TranscriptionEvent,
    TranscriptionJob,
)

if TYPE_CHECKING:
    import numpy as np

    from lllmsd.config import ModelBase


@dataclass(frozen=True, slots=True)
class ModelFiles:
    """Where the store put a model's weights: one file (GGUF) or a folder. ``None`` for the fake engine."""

    path: Path | None


class Engine:
    """Base of every engine class. Subclass the capability classes below, one per kind of job served."""

    name: ClassVar[str]
    serves: ClassVar[frozenset[JobKind]] = frozenset()
    features: ClassVar[frozenset[Feature]] = frozenset()
    # where instances run unless the model's config says otherwise: "process" (a worker process of
    # their own: a crash in the engine's C code costs that instance only) or "thread" (in the daemon)
    isolation: ClassVar[str] = "process"
    # the context window in tokens, for engines that have one: set by the constructor once the weights are
    # loaded (the config's context_size, or what the engine read from the weights); GET / and the KV-cache
    # metric report it
    context_size: int | None = None
    # how many calls the engine runs at once; set by the constructor of an engine that serves several
    # requests on one instance (the pool hands it that many: the config's ``slots``)
    concurrency: int = 1

    def __init__(self, config: Any, files: ModelFiles) -> None:
        self.config = config
        self.files = files

    @classmethod
    def tasks(cls) -> frozenset[ModelTask]:
        """The model tasks this engine class can be configured for."""
        return frozenset(kind.task for kind in cls.serves)

    @classmethod
    def config_problems(cls, config: ModelBase) -> list[tuple[str, str]]:
        """Problems with a model's options that only this engine can see, as (field, message), found when
        the config loads (and by ``lllmsd config check``), before any weights load."""
        return []

    @classmethod
    def config_warnings(cls, config: ModelBase) -> list[tuple[str, str]]:
        """What will not work as asked on this machine but is no error in the config itself (a cuda
        device with no CUDA here), as (field, message); ``lllmsd config check`` prints them. May import the
        engine's library: called off the event loop."""
        return []

    @classmethod
    def check_job(cls, config: ModelBase, job: Job) -> Job | None:
        """Raise UnsupportedParameter / InvalidRequest for what this engine cannot honour beyond its
        declared features. Called on the event loop before the request queues: cheap, no weights. May
        return the job to run instead, carrying what the check built (so it is not built twice)."""
        return None

    @classmethod
    def heavy_check(cls, config: ModelBase, job: Job) -> bool:
        """Whether ``check_job`` may take long enough for this job (milliseconds: converting a large JSON
        Schema into a grammar) that admission should run it in a thread, off the event loop."""
        return False

    @classmethod
    def estimate_memory(cls, config: ModelBase, files: ModelFiles) -> int | None:
        """Bytes one instance will take, known before it loads (GGUF: from the file's metadata), or None:
        the pool then measures the first instance it loads and reuses that (core/budget.py). Called off
        the event loop: it may read the files."""
        return None

    def placement(self, _: object = None) -> dict[str, Any]:
        """Where this instance runs and what it holds (backend, device, context, cache types, memory the
        library reports), for the start-up log and ``GET /``. A ``notes`` list says what the load could not
        honour (offload asked of a build without a GPU backend); the pool logs it once as a warning. Called
        like a job method, on the engine's thread, once after load (the argument is unused)."""
        return {"backend": self.name, "device": "cpu"}

    def close(self) -> None:
        """Free the weights. Called once, on the worker thread."""


class TextEngine(Engine):
    """Chat and completions. Each call yields TextDelta/ToolCallDelta events, one ChoiceEnd per choice,
    and a Usage event last."""

    serves: ClassVar[frozenset[JobKind]] = frozenset({JobKind.CHAT, JobKind.COMPLETION})

    def chat(self, job: ChatJob, cancel: threading.Event) -> Iterator[GenerationEvent]:
        raise NotImplementedError

    def complete(self, job: CompletionJob, cancel: threading.Event) -> Iterator[GenerationEvent]:
        raise NotImplementedError

    def preload(self, preload: Preload) -> int:
        """Evaluate the preload context; return how many tokens are now cached."""
        raise NotImplementedError


class EmbeddingEngine(Engine):
    """One full-length vector per input (the pool applies ``dimensions``) and each input's token count."""

    serves: ClassVar[frozenset[JobKind]] = frozenset({JobKind.EMBEDDING})

    def embed(self, job: EmbeddingJob) -> EmbeddingResult:
        raise NotImplementedError


class TranscriptionEngine(Engine):
    """Yields one TranscriptInfo first, then the segments as they are decoded."""

    serves: ClassVar[frozenset[JobKind]] = frozenset({JobKind.TRANSCRIPTION})

    def transcribe(self, job: TranscriptionJob, cancel: threading.Event) -> Iterator[TranscriptionEvent]:
        raise NotImplementedError


class SpeechEngine(Engine):
    """Text to speech. ``synthesize`` yields each sentence's audio as soon as it is spoken; ``speak``, the
    method the host calls, encodes it in the job's response format as it comes (engines/speech_encoder.py),
    so the first sentence reaches the client while the next one is synthesized. Encoding runs here, beside
    the engine (in its worker process), never on the daemon's event loop."""

    serves: ClassVar[frozenset[JobKind]] = frozenset({JobKind.SPEECH})
    sample_rate: int = 22050  # of the samples ``synthesize`` yields; set by the engine once its voice is loaded

    def synthesize(self, job: SpeechJob, cancel: threading.Event) -> Iterator[np.ndarray]:
        """16-bit mono samples (int16 arrays) at ``sample_rate``, one array per sentence or part of one."""
        raise NotImplementedError

    def speak(self, job: SpeechJob, cancel: threading.Event) -> Iterator[SpeechAudio]:
        from lllmsd.engines.speech_encoder import SpeechEncoder  # PyAV: imported where speech is served

        encoder = SpeechEncoder(job.response_format, self.sample_rate)
        try:
            for samples in self.synthesize(job, cancel):
                if cancel.is_set():
                    return
                yield SpeechAudio(encoder.encode(samples), len(samples) / self.sample_rate)
            yield SpeechAudio(encoder.finish())
        finally:
            encoder.close()


class RerankEngine(Engine):
    """Cross-encoder ranking: one relevance score per document of the job, in its order, from the model
    reading the query and the document together. A long list is scored in batches of ``max_batch_size``
    (query, document) pairs. (Embedding models need no rerank method: core ranks with their embeddings.)"""

    serves: ClassVar[frozenset[JobKind]] = frozenset({JobKind.RERANK})

    def rerank(self, job: RerankJob) -> RerankResult:
        raise NotImplementedError
