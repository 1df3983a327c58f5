"""FakeEngine: deterministic output, no weights, and failure injection, for tests and integration tests.

What it answers, so tests can assert it:
- chat: the words of the last user message, one word per token ("Hello there" -> "Hello there");
  a conversation with no user message answers "Hello".
- completions: the words of the prompt.
- the answer stops at ``max_tokens`` (finish_reason "length") or at a stop sequence (cut before it,
  "stop"), else ends with "stop".
- tools: with tool_choice "required" or a function name, or "auto" when the last user message names a
  tool, it calls that tool with arguments ``{"text": <last user message>}``.
- embeddings: unit vectors derived from a hash of the text (equal texts, equal vectors).
- rerank (a model configured with task rerank): each document scores the share of the query's words it
  contains (case and punctuation ignored), 0 to 1; a pair is as many tokens as it has words, and a pair
  longer than the context is cut to it (``truncate``) or refused naming the document.
- transcription: "fake transcript of N bytes" ("fake translation ..." for translations), in one segment,
  with its words spread evenly over the audio when word timestamps are asked for.
- speech: a tone per sentence, ``FAKE_SPEECH_SECONDS_PER_CHAR`` seconds a character divided by the speed,
  at 22,050 Hz, encoded like any engine's; ``token_delay`` is the time each sentence takes and
  ``fail_after_tokens`` the number of sentences spoken before it fails.
- best_of and suffix are honoured trivially: every candidate is the same, and the answer (the prompt's
  words) does not depend on what follows the prompt.
- grammar, JSON response formats, logprobs of an echoed prompt and chat-template variables
  (chat_template_kwargs, reasoning_effort: it has no template) are not among its declared features,
  so admission refuses them (400), as for a real engine; seed is honoured trivially (the output never
  varies), and so are logit_bias and the penalties.

Its token cache is real bookkeeping: it remembers the tokens it evaluated and reports how many of the
next prompt's leading tokens it already held as ``cached_tokens``, so the pool's routing can be tested.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import threading
import time
from collections.abc import Iterator

import numpy as np

from lllmsd.config import FakeModelConfig
from lllmsd.core.jobs import (
    ChatJob,
    ChatMessage,
    ChoiceEnd,
    CompletionJob,
    EmbeddingJob,
    EmbeddingResult,
    Feature,
    GenerationEvent,
    JobKind,
    Preload,
    RerankJob,
    RerankResult,
    SpeechJob,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
    TopLogprob,
    TranscriptInfo,
    TranscriptionEvent,
    TranscriptionJob,
    TranscriptSegment,
    TranscriptWord,
    Usage,
)
from lllmsd.engines.base import (
    EmbeddingEngine,
    ModelFiles,
    RerankEngine,
    SpeechEngine,
    TextEngine,
    TranscriptionEngine,
)
from lllmsd.errors import ContextLengthExceeded, InvalidRequest

DEFAULT_CONTEXT = 4096
DEFAULT_MAX_TOKENS = 256
FAKE_SPEECH_SECONDS_PER_CHAR = 0.06  # about the pace of real speech
FAKE_SPEECH_RATE = 22050


class FakeEngineFailure(RuntimeError):
    """The failure that ``fail_on_load`` / ``fail_after_tokens`` inject."""


def _words(text: str | None) -> list[str]:
    return (text or "").split()


def _plain_words(text: str) -> list[str]:
    return [word.strip(".,;:!?\"'()").lower() for word in _words(text)]


def chat_prompt_tokens(messages: tuple[ChatMessage, ...]) -> list[str]:
    tokens: list[str] = []
    for message in messages:
        tokens.append(f"<{message.role}>")
        tokens += _words(message.content)
        for call in message.tool_calls:
            tokens += [f"<call:{call.name}>", *_words(call.arguments)]
    tokens.append("<assistant>")
    return tokens


class FakeEngine(TextEngine, EmbeddingEngine, TranscriptionEngine, SpeechEngine, RerankEngine):
    name = "fake"
    serves = frozenset(JobKind)
    features = frozenset(Feature) - {
        Feature.GRAMMAR,
        Feature.JSON_OUTPUT,
        Feature.ECHO_LOGPROBS,
        Feature.TEMPLATE_KWARGS,
    }
    isolation = "thread"  # a test double, often subclassed inside a test: ``isolation: process`` to crash-test
    sample_rate = FAKE_SPEECH_RATE

    def __init__(self, config: FakeModelConfig, files: ModelFiles) -> None:
        super().__init__(config, files)
        if config.load_delay:
            time.sleep(config.load_delay)
        if config.fail_on_load:
            raise FakeEngineFailure("fake engine: fail_on_load is set")
        self.context_size = config.context_size or DEFAULT_CONTEXT
        # ``slots`` requests at once; their cache bookkeeping is then one list, the last request's
        self.concurrency = config.slots
        self.cached: list[str] = []  # the tokens "in the KV cache"
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.cached = []

    # ------------------------------------------------------------------------------------ generation

    def preload(self, preload: Preload) -> int:
        # a preloaded conversation has no assistant turn opened yet: drop the trailing "<assistant>"
        tokens = chat_prompt_tokens(preload.messages)[:-1] if preload.messages else _words(preload.prefix)
        self.cached = tokens
        return len(tokens)

    def chat(self, job: ChatJob, cancel: threading.Event) -> Iterator[GenerationEvent]:
        prompt = chat_prompt_tokens(job.messages)
        last_user = next((m.content for m in reversed(job.messages) if m.role == "user"), None)
        answer = _words(last_user) or ["Hello"]
        tool = self._tool_to_call(job, last_user or "")
        if tool is not None:
            return self._tool_call(prompt, tool, last_user or "", job.n)
        top_logprobs = job.top_logprobs if job.logprobs else None
        return self._generate(prompt, answer, job.sampling, job.n, cancel, top_logprobs)

    def complete(self, job: CompletionJob, cancel: threading.Event) -> Iterator[GenerationEvent]:
        prompt = _words(job.prompt)
        events = self._generate(prompt, list(prompt) or ["Hello"], job.sampling, job.n, cancel, job.logprobs)
        if not job.echo:
            return events
        return self._echoed(job.prompt, job.n, events)

    @staticmethod
    def _echoed(prompt: str, n: int, events: Iterator[GenerationEvent]) -> Iterator[GenerationEvent]:
        for choice in range(n):
            yield TextDelta(prompt, choice=choice)
        yield from events

    def _tool_to_call(self, job: ChatJob, last_user: str) -> str | None:
        if not job.tools or job.tool_choice == "none":
            return None
        names = [t.name for t in job.tools]
        if job.tool_choice == "required":
            return names[0]
        if job.tool_choice not in (None, "auto"):
            return job.tool_choice
        return next((name for name in names if name in last_user), None)

    def _tool_call(self, prompt: list[str], tool: str, text: str, n: int) -> Iterator[GenerationEvent]:
        self._check_context(prompt, 1)
        cached = self._take_cache(prompt)
        arguments = json.dumps({"text": text}, separators=(",", ":"))
        half = len(arguments) // 2
        for choice in range(n):
            call_id = f"call_{hashlib.sha256(f'{tool}{text}{choice}'.encode()).hexdigest()[:12]}"
            yield ToolCallDelta(0, arguments[:half], id=call_id, name=tool, choice=choice)
            yield ToolCallDelta(0, arguments[half:], choice=choice)
            yield ChoiceEnd("tool_calls", choice=choice)
        self.cached = [*prompt, f"<call:{tool}>", *_words(arguments)]
        yield Usage(len(prompt), 2 * n, cached)

    def _check_context(self, prompt: list[str], max_tokens: int | None, strict: bool = False) -> None:
        if len(prompt) + 1 > self.context_size:
            raise ContextLengthExceeded(len(prompt) + 1, self.context_size)
        # OpenAI's rule: the prompt and the max_tokens the client asked for must fit in the context together
        if strict and max_tokens is not None and len(prompt) + max_tokens > self.context_size:
            raise ContextLengthExceeded(len(prompt) + max_tokens, self.context_size, param="max_tokens")

    def _take_cache(self, prompt: list[str]) -> int:
        cached = 0
        for mine, theirs in zip(self.cached, prompt, strict=False):
            if mine != theirs:
                break
            cached += 1
        return min(cached, max(len(prompt) - 1, 0))  # like llama.cpp: the last prompt token is always evaluated

    def _generate(
        self,
        prompt: list[str],
        answer: list[str],
        sampling,
        n: int,
        cancel: threading.Event,
        top_logprobs: int | None,
    ) -> Iterator[GenerationEvent]:
        self._check_context(prompt, sampling.max_tokens, sampling.strict_max_tokens)
        max_tokens = sampling.max_tokens or DEFAULT_MAX_TOKENS
        cached = self._take_cache(prompt)
        self.cached = list(prompt)
        produced = 0
        for choice in range(n):
            emitted: list[str] = []
            text = ""
            finish = "stop"
            for position, word in enumerate(answer):
                if position >= max_tokens or len(prompt) + len(emitted) >= self.context_size or sampling.out_of_time():
                    finish = "length"
                    break
                if cancel.is_set():
                    return
                if self.config.token_delay and cancel.wait(self.config.token_delay):
                    return
                if self.config.fail_after_tokens is not None and produced >= self.config.fail_after_tokens:
                    self.cached = []
                    raise FakeEngineFailure(f"fake engine: failing after {produced} tokens as configured")
                piece = word if position == 0 else f" {word}"
                candidate = text + piece
                hit = next((s for s in sampling.stop if s and s in candidate), None)
                if hit is not None:
                    cut = candidate[: candidate.index(hit)]
                    if len(cut) > len(text):
                        yield TextDelta(cut[len(text) :], choice=choice)
                    break
                text = candidate
                emitted.append(word)
                produced += 1
                logprobs = self._logprobs(piece, position, len(text) - len(piece), top_logprobs)
                yield TextDelta(piece, choice=choice, logprobs=logprobs)
            yield ChoiceEnd(finish, choice=choice)
            if choice == 0:
                self.cached = prompt + emitted
        yield Usage(len(prompt), produced, cached)

    @staticmethod
    def _logprobs(piece: str, position: int, offset: int, top: int | None) -> tuple[TokenLogprob, ...]:
        if top is None:
            return ()
        logprob = -0.1 * (position + 1)
        alternatives = tuple(
            TopLogprob(token=piece if k == 0 else f" alt{k}", logprob=logprob - k, bytes=tuple(piece.encode()))
            for k in range(top)
        )
        return (TokenLogprob(piece, logprob, tuple(piece.encode()), alternatives, offset),)

    # ------------------------------------------------------------------------------------ embeddings

    def embed(self, job: EmbeddingJob) -> EmbeddingResult:
        vectors = []
        counts = []
        for item in job.inputs:
            text = item if isinstance(item, str) else " ".join(str(t) for t in item)
            counts.append(len(item) if not isinstance(item, str) else max(len(_words(item)), 1))
            vectors.append(self._vector(text, self.config.dimensions))
        return EmbeddingResult(vectors=vectors, token_counts=counts)

    @staticmethod
    def _vector(text: str, dimensions: int) -> list[float]:
        raw: list[float] = []
        counter = 0
        while len(raw) < dimensions:
            digest = hashlib.sha256(f"{counter}:{text}".encode()).digest()
            raw += [v / 2**31 - 1.0 for v in struct.unpack("<8I", digest)]
            counter += 1
        raw = raw[:dimensions]
        norm = math.sqrt(sum(v * v for v in raw)) or 1.0
        return [v / norm for v in raw]

    # ---------------------------------------------------------------------------------------- rerank

    def rerank(self, job: RerankJob) -> RerankResult:
        query = _plain_words(job.query)
        scores: list[float] = []
        tokens = 0
        for index, document in enumerate(job.documents):
            length = len(_words(job.query)) + len(_words(document))
            if length > self.context_size and not self.config.truncate:
                raise InvalidRequest(
                    f"documents[{index}] is {length} tokens long together with the query, but this model reads "
                    f"at most {self.context_size} (truncate is off for this model)",
                    param="documents",
                    code="context_length_exceeded",
                )
            tokens += min(length, self.context_size)
            found = set(_plain_words(document))
            scores.append(sum(1 for word in query if word in found) / len(query) if query else 0.0)
        return RerankResult(scores=scores, total_tokens=tokens)

    # --------------------------------------------------------------------------------- transcription

    def transcribe(self, job: TranscriptionJob, cancel: threading.Event) -> Iterator[TranscriptionEvent]:
        duration = round(len(job.audio) / 32000, 3)  # as if 16 kHz 16-bit mono
        yield TranscriptInfo(language=job.language or "en", duration=duration)
        if cancel.is_set():
            return
        text = f"fake {'translation' if job.translate else 'transcript'} of {len(job.audio)} bytes"
        words = _timed_words(text, duration) if job.word_timestamps else ()
        yield TranscriptSegment(id=0, start=0.0, end=duration, text=text, words=words)

    # ---------------------------------------------------------------------------------------- speech

    def synthesize(self, job: SpeechJob, cancel: threading.Event) -> Iterator[np.ndarray]:
        for index, sentence in enumerate(job.sentences):
            if self.config.token_delay and cancel.wait(self.config.token_delay):
                return
            if cancel.is_set():
                return
            if self.config.fail_after_tokens is not None and index >= self.config.fail_after_tokens:
                raise FakeEngineFailure(f"fake engine: failing after {index} sentences as configured")
            yield _tone(len(sentence) * FAKE_SPEECH_SECONDS_PER_CHAR / job.speed, 200.0 + 40.0 * (index % 8))


def _tone(seconds: float, frequency: float) -> np.ndarray:
    """A sine tone at half of full scale, as 16-bit samples."""
    t = np.arange(round(seconds * FAKE_SPEECH_RATE)) / FAKE_SPEECH_RATE
    return (np.sin(2 * np.pi * frequency * t) * 16000).astype(np.int16)


def _timed_words(text: str, duration: float) -> tuple[TranscriptWord, ...]:
    """The words of ``text`` spread evenly over ``duration`` seconds."""
    words = text.split()
    step = duration / len(words)
    return tuple(
        TranscriptWord(start=round(i * step, 3), end=round((i + 1) * step, 3), word=f" {w}", probability=1.0)
        for i, w in enumerate(words)
    )
