"""Engine-neutral tasks, the events engines produce, and the results the core assembles from them.

These dataclasses are the only vocabulary shared by the API layer and the engines: the API converts an
OpenAI request into a task, an engine turns a task into a stream of events, and the API renders the
events (or the result collected from them) in the OpenAI wire format. Nothing here knows HTTP or pydantic.

Every text generator is a stream of events: a non-streaming response is the same stream collected by
``collect_generation``, so engines implement one code path and the two response modes cannot drift.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


class ModelTask(str, enum.Enum):
    """What a configured model is for (the config's ``task:``)."""

    TEXT_COMPLETION = "text-completion"
    EMBEDDING = "embedding"
    SPEECH_TO_TEXT = "speech-to-text"


# ---------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model emitted it


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # system | user | assistant | tool
    content: str | None = None
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def identity(self) -> Hashable:
        """What makes two messages the same for context matching."""
        return (self.role, self.content, self.name, self.tool_calls, self.tool_call_id)


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # JSON Schema


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """``text``, ``json_object`` (any JSON object) or ``json_schema`` (``schema`` must validate)."""

    type: str = "text"
    schema: dict[str, Any] | None = None
    name: str | None = None
    strict: bool | None = None


@dataclass(frozen=True, slots=True)
class Sampling:
    """Sampling parameters. ``None`` means "the engine's OpenAI-compatible default"."""

    max_tokens: int | None = None
    # The client asked for exactly max_tokens: if the prompt leaves less room, refuse (400) as OpenAI does.
    # A default (the config's or the completions route's) is shortened to fit instead.
    strict_max_tokens: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logit_bias: dict[int, float] | None = None


@dataclass(frozen=True, slots=True)
class Preload:
    """What every new instance evaluates once when it is created (the config's ``preload:``)."""

    messages: tuple[ChatMessage, ...] = ()
    prefix: str | None = None


@dataclass(frozen=True, slots=True)
class ChatTask:
    messages: tuple[ChatMessage, ...]
    sampling: Sampling = field(default_factory=Sampling)
    n: int = 1
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str | None = None  # none | auto | required | a function name
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    grammar: str | None = None  # GBNF text, already resolved from a named grammar

    def context(self) -> Context:
        return Context.of_messages(self.messages)


@dataclass(frozen=True, slots=True)
class CompletionTask:
    prompt: str
    sampling: Sampling = field(default_factory=Sampling)
    n: int = 1
    best_of: int | None = None
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    grammar: str | None = None

    def context(self) -> Context:
        return Context.of_text(self.prompt)


@dataclass(frozen=True, slots=True)
class EmbeddingTask:
    """Texts, or token id lists, to embed. ``dimensions`` truncates and re-normalises."""

    inputs: tuple[str | tuple[int, ...], ...]
    dimensions: int | None = None


@dataclass(frozen=True, slots=True)
class TranscriptionTask:
    audio: bytes
    filename: str = "audio"
    language: str | None = None
    prompt: str | None = None
    temperature: float | None = None
    translate: bool = False
    word_timestamps: bool = False


# --------------------------------------------------------------------------------------------- context


@dataclass(frozen=True, slots=True)
class Context:
    """What an instance holds evaluated, as the pool sees it, for routing a request to its cache.

    ``items`` is a tuple of message identities (chat) or the text itself (completions); a request matches
    an instance by the length of their common prefix of the same kind. The engine stays the judge of
    what its cache really holds; this is only the routing hint.
    """

    kind: str = "empty"  # empty | chat | text
    items: tuple[Hashable, ...] | str = ()

    @classmethod
    def of_messages(cls, messages: Iterable[ChatMessage]) -> Context:
        items = tuple(m.identity() for m in messages)
        return cls("chat", items) if items else EMPTY_CONTEXT

    @classmethod
    def of_text(cls, text: str) -> Context:
        return cls("text", text) if text else EMPTY_CONTEXT

    @property
    def empty(self) -> bool:
        return not self.items

    def __len__(self) -> int:
        return len(self.items)

    def match_length(self, wanted: Context) -> int:
        """Length of the common prefix of this cached context and a request's, 0 if of other kinds."""
        if self.kind != wanted.kind or self.empty:
            return 0
        mine, theirs = self.items, wanted.items
        limit = min(len(mine), len(theirs))
        i = 0
        while i < limit and mine[i] == theirs[i]:
            i += 1
        return i

    def extended(self, continuation: Context) -> Context:
        if self.kind != continuation.kind and not self.empty:
            return continuation
        return Context(continuation.kind, self.items + continuation.items)  # type: ignore[operator]


EMPTY_CONTEXT = Context()


def context_after(task: ChatTask | CompletionTask, reply: str) -> Context:
    """What an instance holds after answering ``task`` with ``reply`` (its only choice), for affinity."""
    if isinstance(task, ChatTask):
        return Context.of_messages((*task.messages, ChatMessage(role="assistant", content=reply)))
    return Context.of_text(task.prompt + reply)


# -------------------------------------------------------------------------------------- engine events


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...] | None = None
    top: tuple[TopLogprob, ...] = ()
    text_offset: int = 0


@dataclass(frozen=True, slots=True)
class TextDelta:
    """Generated text for one choice. ``logprobs`` covers exactly the tokens in ``text``."""

    text: str
    choice: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A fragment of a tool call: the first fragment of a call has ``id`` and ``name``."""

    call_index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None
    choice: int = 0


@dataclass(frozen=True, slots=True)
class ChoiceEnd:
    finish_reason: str  # stop | length | tool_calls
    choice: int = 0


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


GenerationEvent = TextDelta | ToolCallDelta | ChoiceEnd | Usage


# ---------------------------------------------------------------------------------------------- results


@dataclass(slots=True)
class ChoiceResult:
    index: int
    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None


@dataclass(slots=True)
class GenerationResult:
    choices: list[ChoiceResult]
    usage: Usage


def collect_generation(events: Iterable[GenerationEvent], n: int = 1) -> GenerationResult:
    """Fold a stream of generation events into the complete result (the non-streaming response)."""
    choices = [ChoiceResult(index=i) for i in range(n)]
    texts: list[list[str]] = [[] for _ in range(n)]
    calls: list[dict[int, list[str | None]]] = [{} for _ in range(n)]  # call_index -> [id, name, args]
    usage = Usage(0, 0)
    for event in events:
        if isinstance(event, TextDelta):
            texts[event.choice].append(event.text)
            if event.logprobs:
                choices[event.choice].logprobs += event.logprobs
        elif isinstance(event, ToolCallDelta):
            call = calls[event.choice].setdefault(event.call_index, [None, None, ""])
            call[0] = call[0] or event.id
            call[1] = call[1] or event.name
            call[2] = f"{call[2]}{event.arguments}"
        elif isinstance(event, ChoiceEnd):
            choices[event.choice].finish_reason = event.finish_reason
        elif isinstance(event, Usage):
            usage = event
    for i, choice in enumerate(choices):
        choice.text = "".join(texts[i])
        choice.tool_calls = tuple(
            ToolCall(id=str(c[0]), name=str(c[1]), arguments=str(c[2])) for _, c in sorted(calls[i].items())
        )
    return GenerationResult(choices=choices, usage=usage)


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    """One vector per input, in input order, and the real token count of each input."""

    vectors: Sequence[Sequence[float]]
    token_counts: Sequence[int]


@dataclass(frozen=True, slots=True)
class TranscriptWord:
    start: float
    end: float
    word: str
    probability: float | None = None


@dataclass(frozen=True, slots=True)
class TranscriptSegment:
    id: int
    start: float
    end: float
    text: str
    words: tuple[TranscriptWord, ...] = ()
    avg_logprob: float | None = None
    no_speech_prob: float | None = None
    compression_ratio: float | None = None
    temperature: float | None = None
    tokens: tuple[int, ...] = ()
    seek: int = 0  # offset of the decoding window, in 10 ms mel frames (OpenAI's verbose_json `seek`)


@dataclass(frozen=True, slots=True)
class TranscriptInfo:
    """Sent first by a transcription stream: what the engine found out before decoding."""

    language: str
    duration: float


TranscriptionEvent = TranscriptInfo | TranscriptSegment
