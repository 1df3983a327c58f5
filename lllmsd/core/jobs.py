"""Engine-neutral jobs, the events engines produce, and the results the core assembles from them.

These dataclasses are the only vocabulary shared by the API layer and the engines: the API converts an
OpenAI request into a job, an engine turns a job into a stream of events, and the API renders the
events (or the result collected from them) in the OpenAI wire format. Nothing here knows HTTP or pydantic.

Words, each with one meaning:
- a model's *task* (``ModelTask``, the config's ``task:``) is what a configured model is for;
- a *job* (``ChatJob``, ``EmbeddingJob``, ...) is one request handed to an engine; its ``kind``
  (``JobKind``) says which engine method serves it and which task of model can take it;
- a *feature* (``Feature``) is an optional part of a job that an engine may or may not honour: each job
  says which features it uses (``features_used``) and each engine class declares the ones it honours.

Every text generator is a stream of events: a non-streaming response is the same stream collected by
``collect_generation``, so engines implement one code path and the two response modes cannot drift.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar


class ModelTask(str, enum.Enum):
    """What a configured model is for (the config's ``task:``)."""

    TEXT_COMPLETION = "text-completion"
    EMBEDDING = "embedding"
    SPEECH_TO_TEXT = "speech-to-text"
    TEXT_TO_SPEECH = "text-to-speech"
    RERANK = "rerank"


class JobKind(str, enum.Enum):
    """The kinds of job an engine can serve, one engine method each."""

    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"
    TRANSCRIPTION = "transcription"
    SPEECH = "speech"
    RERANK = "rerank"

    @property
    def task(self) -> ModelTask:
        """The task a model must be configured for to take jobs of this kind."""
        return _TASK_OF_KIND[self]

    def answered_through(self, task: ModelTask) -> JobKind | None:
        """The kind of job core turns a request of this kind into on a model of another ``task``, if it
        can: a rerank request to an embedding model is answered from the embeddings of the query and the
        documents, by cosine similarity (core/rerank.py). None: only models of ``self.task`` serve it."""
        return _ANSWERED_THROUGH.get((self, task))


_TASK_OF_KIND = {
    JobKind.CHAT: ModelTask.TEXT_COMPLETION,
    JobKind.COMPLETION: ModelTask.TEXT_COMPLETION,
    JobKind.EMBEDDING: ModelTask.EMBEDDING,
    JobKind.TRANSCRIPTION: ModelTask.SPEECH_TO_TEXT,
    JobKind.SPEECH: ModelTask.TEXT_TO_SPEECH,
    JobKind.RERANK: ModelTask.RERANK,
}
_ANSWERED_THROUGH = {(JobKind.RERANK, ModelTask.EMBEDDING): JobKind.EMBEDDING}


class Feature(str, enum.Enum):
    """An optional part of a job. An engine declares the features it honours; admission refuses (400,
    naming the request parameter) a job that uses one its engine does not declare, so nothing a client
    asked for is silently ignored."""

    N = "n"  # more than one choice
    BEST_OF = "best_of"  # candidates ranked by mean token logprob
    SEED = "seed"
    LOGPROBS = "logprobs"
    LOGIT_BIAS = "logit_bias"
    PENALTIES = "penalties"  # OpenAI's frequency_penalty / presence_penalty
    GRAMMAR = "grammar"  # a GBNF grammar (or a named one)
    JSON_OUTPUT = "json_output"  # response_format json_object / json_schema
    TOOLS = "tools"  # tools, tool_choice, and tool calls or results in the history
    ECHO = "echo"
    ECHO_LOGPROBS = "echo_logprobs"  # logprobs of an echoed prompt
    SUFFIX = "suffix"  # fill in the middle
    TOKEN_INPUT = "token_input"  # embedding inputs given as token ids
    TRANSLATION = "translation"  # speech to English text
    WORD_TIMESTAMPS = "word_timestamps"
    TEMPLATE_KWARGS = "template_kwargs"  # chat_template_kwargs, reasoning_effort: variables for a chat template


FeatureUse = tuple[Feature, str]  # a feature and the request parameter that asked for it


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
class CompiledGrammars:
    """What an engine's ``check_job`` built from a job's grammar, JSON Schemas and tools (llama-cpp: GBNF
    text), carried with the job to its instance so that generation does not build it again: each schema
    of a request is converted once. ``None`` where the job asks for none."""

    output: str | None = None  # the grammar every answer follows (grammar, response_format)
    output_param: str | None = None  # the request parameter it came from, named by an error about it
    # the GBNF rule of each tool a call may use (by its schema) and the rules' text: the call syntax around
    # them is the model family's, which the engine knows once the model is loaded
    tool_arguments: tuple[tuple[str, ...], str] | None = None


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
    # The request's time budget (max_request_seconds) as a time.monotonic() value, the same clock in every
    # process of the machine: once it passes, generation ends as if max_tokens were reached ("length").
    deadline: float | None = None

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


@dataclass(frozen=True, slots=True)
class Preload:
    """What every new instance evaluates once when it is created (the config's ``preload:``)."""

    messages: tuple[ChatMessage, ...] = ()
    prefix: str | None = None


def _sampling_features(sampling: Sampling) -> list[FeatureUse]:
    used: list[FeatureUse] = []
    if sampling.seed is not None:
        used.append((Feature.SEED, "seed"))
    if sampling.logit_bias:
        used.append((Feature.LOGIT_BIAS, "logit_bias"))
    if sampling.frequency_penalty:
        used.append((Feature.PENALTIES, "frequency_penalty"))
    if sampling.presence_penalty:
        used.append((Feature.PENALTIES, "presence_penalty"))
    return used


@dataclass(frozen=True, slots=True)
class ChatJob:
    kind: ClassVar[JobKind] = JobKind.CHAT

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
    # The client reads events as they come (a stream): a tool call cut short has been seen in part, so an
    # engine cannot turn it into content afterwards, as it does for a collected answer.
    stream: bool = False
    # Extra variables for the model's chat template (e.g. enable_thinking), and OpenAI's reasoning_effort
    # (low | medium | high), which templates that take it read as ``reasoning_effort``.
    template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    compiled: CompiledGrammars | None = None  # set by the engine's check_job (admission), if it builds any

    def context(self) -> Context:
        return Context.of_messages(self.messages)

    def features_used(self) -> list[FeatureUse]:
        used = _sampling_features(self.sampling)
        if self.n != 1:
            used.append((Feature.N, "n"))
        if self.logprobs or self.top_logprobs:
            used.append((Feature.LOGPROBS, "logprobs" if self.logprobs else "top_logprobs"))
        if self.grammar is not None:
            used.append((Feature.GRAMMAR, "grammar"))
        if self.response_format is not None and self.response_format.type != "text":
            used.append((Feature.JSON_OUTPUT, "response_format"))
        if self.tools:
            used.append((Feature.TOOLS, "tools"))
        if self.tool_choice not in (None, "none"):
            used.append((Feature.TOOLS, "tool_choice"))
        if any(m.role == "tool" or m.tool_calls for m in self.messages):
            used.append((Feature.TOOLS, "messages"))
        if self.template_kwargs:
            used.append((Feature.TEMPLATE_KWARGS, "chat_template_kwargs"))
        if self.reasoning_effort is not None:
            used.append((Feature.TEMPLATE_KWARGS, "reasoning_effort"))
        return used


@dataclass(frozen=True, slots=True)
class CompletionJob:
    kind: ClassVar[JobKind] = JobKind.COMPLETION

    prompt: str
    sampling: Sampling = field(default_factory=Sampling)
    n: int = 1
    best_of: int | None = None
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    grammar: str | None = None
    compiled: CompiledGrammars | None = None  # set by the engine's check_job (admission), if it builds any

    def context(self) -> Context:
        return Context.of_text(self.prompt)

    def features_used(self) -> list[FeatureUse]:
        used = _sampling_features(self.sampling)
        if self.n != 1:
            used.append((Feature.N, "n"))
        if self.best_of not in (None, 1):
            used.append((Feature.BEST_OF, "best_of"))
        if self.logprobs is not None:
            used.append((Feature.LOGPROBS, "logprobs"))
        if self.echo:
            used.append((Feature.ECHO, "echo"))
        if self.echo and self.logprobs is not None:
            used.append((Feature.ECHO_LOGPROBS, "logprobs"))
        if self.suffix is not None:
            used.append((Feature.SUFFIX, "suffix"))
        if self.grammar is not None:
            used.append((Feature.GRAMMAR, "grammar"))
        return used


@dataclass(frozen=True, slots=True)
class EmbeddingJob:
    """Texts, or token id lists, to embed. Engines return full vectors; the pool applies ``dimensions``
    (OpenAI's shortening: truncate and re-normalise) once, for every engine."""

    kind: ClassVar[JobKind] = JobKind.EMBEDDING

    inputs: tuple[str | tuple[int, ...], ...]
    dimensions: int | None = None
    # what errors call each input, when it is not the request's input[i]: a rerank request answered by
    # cosine embeds its query and documents, and a too-long one is "documents[3]", as the client sent it
    names: tuple[str, ...] | None = None

    def features_used(self) -> list[FeatureUse]:
        if any(not isinstance(item, str) for item in self.inputs):
            return [(Feature.TOKEN_INPUT, "input")]
        return []

    def name_of(self, index: int) -> tuple[str, str]:
        """(what an error message calls input ``index``, the request parameter it came from)."""
        if self.names is None:
            return f"input[{index}]", "input"
        name = self.names[index]
        return name, name.partition("[")[0]


@dataclass(frozen=True, slots=True)
class TranscriptionJob:
    kind: ClassVar[JobKind] = JobKind.TRANSCRIPTION

    audio: bytes
    filename: str = "audio"
    language: str | None = None
    prompt: str | None = None
    temperature: float | None = None
    translate: bool = False
    word_timestamps: bool = False

    def features_used(self) -> list[FeatureUse]:
        used: list[FeatureUse] = []
        if self.translate:
            used.append((Feature.TRANSLATION, "model"))
        if self.word_timestamps:
            used.append((Feature.WORD_TIMESTAMPS, "timestamp_granularities"))
        return used


@dataclass(frozen=True, slots=True)
class SpeechJob:
    """Text to speak, already split into sentences by lllmsd (``core/sentences.py``), none longer than
    the splitter's bound: an engine never sees a whole 4,096-character text at once, and the first
    sentence can be heard before the second is synthesized."""

    kind: ClassVar[JobKind] = JobKind.SPEECH

    sentences: tuple[str, ...]
    voice: str  # the voice name the client asked for, one the model's config lists
    speaker: int | str | None = None  # that voice's speaker (id or name) in the model; None = its default
    speed: float = 1.0
    response_format: str = "mp3"  # mp3 | opus | aac | flac | wav | pcm: the engine encodes (engines/speech_encoder.py)

    def features_used(self) -> list[FeatureUse]:
        return []


@dataclass(frozen=True, slots=True)
class RerankJob:
    """A query and the documents to score against it. Engines return one score per document, in this
    order; sorting, ``top_n`` and returning the documents are the API's."""

    kind: ClassVar[JobKind] = JobKind.RERANK

    query: str
    documents: tuple[str, ...]

    def features_used(self) -> list[FeatureUse]:
        return []


Job = ChatJob | CompletionJob | EmbeddingJob | TranscriptionJob | SpeechJob | RerankJob


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


EMPTY_CONTEXT = Context()


def context_after(job: ChatJob | CompletionJob, reply: str) -> Context:
    """What an instance holds after answering ``job`` with ``reply`` (its only choice), for affinity."""
    if isinstance(job, ChatJob):
        return Context.of_messages((*job.messages, ChatMessage(role="assistant", content=reply)))
    return Context.of_text(job.prompt + reply)


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
class ReasoningDelta:
    """Reasoning text for one choice (a thinking model's ``<think>`` part): never part of the content or
    of a tool call. Rendered as ``reasoning_content`` (chat) or a ``reasoning`` output item (Responses)."""

    text: str
    choice: int = 0


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


GenerationEvent = TextDelta | ReasoningDelta | ToolCallDelta | ChoiceEnd | Usage


# ---------------------------------------------------------------------------------------------- results


@dataclass(slots=True)
class ChoiceResult:
    index: int
    text: str = ""
    reasoning: str = ""
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
    reasonings: list[list[str]] = [[] for _ in range(n)]
    calls: list[dict[int, list[str | None]]] = [{} for _ in range(n)]  # call_index -> [id, name, args]
    usage = Usage(0, 0)
    for event in events:
        if isinstance(event, TextDelta):
            texts[event.choice].append(event.text)
            if event.logprobs:
                choices[event.choice].logprobs += event.logprobs
        elif isinstance(event, ReasoningDelta):
            reasonings[event.choice].append(event.text)
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
        choice.reasoning = "".join(reasonings[i])
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
class RerankResult:
    """One relevance score per document, in the job's order (higher is more relevant), and the tokens the
    model read for the whole request."""

    scores: Sequence[float]
    total_tokens: int


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


@dataclass(frozen=True, slots=True)
class SpeechAudio:
    """The next bytes of a speech job's audio file, in its response format, and how many seconds of
    speech were synthesized since the previous event. A format that cannot stream (wav) sends empty
    ``data`` until its last event, which carries the whole file."""

    data: bytes
    seconds: float = 0.0
