"""Pydantic models of every response body the daemon sends, for the OpenAPI document and its tests.

The handlers build their bodies as plain dicts (fast, and shaped exactly as shared/OPENAI-WIRE.md says);
these models describe those dicts. They are strict (``extra="forbid"``, every always-present key
required), and the tests validate real responses with them and fuzz the API against the document built
from them, so a handler that changes a shape without changing its model fails a test: the document
cannot drift from what is served.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lllmsd.core.jobs import ModelTask


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -------------------------------------------------------------------------------------------- errors


class ErrorDetail(_Body):
    message: str = Field(description="What went wrong, for a human; never a stack trace.")
    type: str = Field(description="OpenAI error type: invalid_request_error, authentication_error, server_error, ...")
    param: str | None = Field(description="The request field at fault, if one is.")
    code: str | None = Field(description="A stable machine-readable code (model_not_found, queue_full, ...).")


class ErrorResponse(_Body):
    """Every non-2xx response, whatever raised it."""

    error: ErrorDetail


# ------------------------------------------------------------------------------------- shared pieces

FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class PromptTokensDetails(_Body):
    cached_tokens: int = Field(description="Prompt tokens the instance already held in its cache.")


class Usage(_Body):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(_Body):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(_Body):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Body):
    content: list[TokenLogprob]
    refusal: None


class CompletionLogprobs(_Body):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


# ----------------------------------------------------------------------------------- chat completions


class FunctionCall(_Body):
    name: str
    arguments: str = Field(description="JSON text, as the model emitted it.")


class ToolCall(_Body):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(_Body):
    role: Literal["assistant"]
    content: str | None
    refusal: None
    tool_calls: list[ToolCall] | None = Field(None, description="Present when the model called tools.")
    reasoning_content: str | None = Field(
        None, description="A thinking model's reasoning (its <think> text), apart from the answer; absent if none."
    )


class ChatChoice(_Body):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class _Header(_Body):
    id: str
    created: int
    model: str = Field(description="The model id the request named.")
    system_fingerprint: str


class ChatCompletion(_Header):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(_Body):
    name: str | None = None
    arguments: str


class ToolCallDelta(_Body):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(_Body):
    role: Literal["assistant"] | None = None
    content: str | None = None
    refusal: None = None
    tool_calls: list[ToolCallDelta] | None = None
    reasoning_content: str | None = Field(None, description="A fragment of a thinking model's reasoning.")


class ChatChunkChoice(_Body):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Header):
    """One ``data:`` event of a streamed chat completion."""

    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, description="With stream_options.include_usage: null, then once the total.")


# ------------------------------------------------------------------------------------------ completions


class CompletionChoice(_Body):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None = Field(description="Null on the chunks before a choice's last.")


class Completion(_Header):
    """A completion, and also one ``data:`` event of a streamed one (same object name, as OpenAI's)."""

    object: Literal["text_completion"]
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, description="Always present outside streams.")


# -------------------------------------------------------------------------------------- responses API


class ResponseOutputText(_Body):
    type: Literal["output_text"]
    text: str
    annotations: list[Any] = Field(description="Always empty: no hosted tool cites sources here.")
    logprobs: list[dict[str, Any]] = Field(description="Token logprobs, with include message.output_text.logprobs.")


class ResponseOutputMessage(_Body):
    id: str
    type: Literal["message"]
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"]
    content: list[ResponseOutputText]


class ResponseFunctionCall(_Body):
    id: str
    type: Literal["function_call"]
    status: Literal["in_progress", "completed", "incomplete"]
    call_id: str = Field(description="What the client's function_call_output names.")
    name: str
    arguments: str = Field(description="Compact JSON text.")


class ResponseInputTokensDetails(_Body):
    cached_tokens: int = Field(description="Input tokens the instance already held in its KV cache.")
    cache_write_tokens: int = Field(description="Input tokens evaluated now (and held for the next turn).")


class ResponseOutputTokensDetails(_Body):
    reasoning_tokens: int


class ResponseUsage(_Body):
    input_tokens: int
    input_tokens_details: ResponseInputTokensDetails
    output_tokens: int
    output_tokens_details: ResponseOutputTokensDetails
    total_tokens: int


class ResponseError(_Body):
    code: str
    message: str


class ResponseObject(_Body):
    """A Response: what POST /v1/responses answers and GET /v1/responses/{id} returns."""

    id: str = Field(description="resp_...")
    object: Literal["response"]
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    background: Literal[False]
    error: ResponseError | None
    incomplete_details: dict[str, Any] | None = Field(description="{reason: max_output_tokens} when incomplete.")
    instructions: str | None
    max_output_tokens: int | None
    max_tool_calls: None
    model: str = Field(description="The model id the request named.")
    output: list[ResponseOutputMessage | ResponseFunctionCall]
    parallel_tool_calls: bool
    previous_response_id: str | None
    prompt_cache_key: str | None
    reasoning: dict[str, Any]
    safety_identifier: str | None
    service_tier: str
    store: bool
    temperature: float | None
    text: dict[str, Any] = Field(description="{format: {type: text | json_object | json_schema, ...}}")
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    top_logprobs: int | None
    top_p: float | None
    truncation: Literal["auto", "disabled"]
    usage: ResponseUsage | None
    user: str | None
    metadata: dict[str, str]


class ResponseStreamEvent(_Body):
    """One typed event of a streamed Response (response.created, response.output_text.delta, ...,
    response.completed); its other fields are those of its type in OpenAI's API."""

    model_config = ConfigDict(extra="allow")
    type: str
    sequence_number: int = Field(description="0, 1, 2, ... in the order sent.")


class ResponseInputItemList(_Body):
    object: Literal["list"]
    data: list[dict[str, Any]] = Field(description="Input items (message, function_call, function_call_output, ...).")
    first_id: str | None
    last_id: str | None
    has_more: bool


class ResponseDeleted(_Body):
    id: str
    object: Literal["response.deleted"]
    deleted: Literal[True]


# ------------------------------------------------------------------------------------------- embeddings


class Embedding(_Body):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 of little-endian float32 bytes.")


class EmbeddingUsage(_Body):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(_Body):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# ----------------------------------------------------------------------------------------------- rerank


class RerankDocument(_Body):
    text: str


class RerankItem(_Body):
    index: int = Field(description="The document's position in the request's documents.")
    relevance_score: float = Field(
        description="Higher is more relevant: a rerank model's score (0 to 1 for most), or an embedding "
        "model's cosine similarity (-1 to 1)."
    )
    document: RerankDocument | None = Field(None, description="With return_documents (the default).")


class RerankUsage(_Body):
    total_tokens: int


class RerankResponse(_Body):
    """Results sorted by relevance_score, highest first; at most top_n of them."""

    id: str
    model: str
    results: list[RerankItem]
    usage: RerankUsage


# ----------------------------------------------------------------------------------------------- models


class ModelObject(_Body):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Body):
    object: Literal["list"]
    data: list[ModelObject]


# ------------------------------------------------------------------------------------------------ audio


class AudioUsage(_Body):
    type: Literal["duration"]
    seconds: float


class Transcription(_Body):
    """``response_format: json`` (the default)."""

    text: str
    usage: AudioUsage


class TranscriptionSegment(_Body):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class TranscriptionWord(_Body):
    word: str
    start: float
    end: float


class VerboseTranscription(_Body):
    """``response_format: verbose_json``."""

    task: Literal["transcribe", "translate"]
    language: str
    duration: float
    text: str
    segments: list[TranscriptionSegment] | None = None
    words: list[TranscriptionWord] | None = None
    usage: AudioUsage


class TranscriptTextDelta(_Body):
    """A ``data:`` event of a streamed transcription."""

    type: Literal["transcript.text.delta"]
    delta: str


class TranscriptTextDone(_Body):
    type: Literal["transcript.text.done"]
    text: str


class SpeechUsage(_Body):
    input_tokens: int = Field(description="Characters of the input (speaking involves no tokenizer).")
    output_tokens: int
    total_tokens: int
    seconds: float = Field(description="Seconds of audio produced.")


class SpeechAudioDelta(_Body):
    """A ``data:`` event of a speech stream (``stream_format: sse``): the next bytes of the audio file."""

    type: Literal["speech.audio.delta"]
    audio: str = Field(description="Base64 of the next bytes of the file in the response format.")


class SpeechAudioDone(_Body):
    type: Literal["speech.audio.done"]
    usage: SpeechUsage


# ----------------------------------------------------------------------------------------------- status


class Health(_Body):
    status: Literal["ok"]


class Ready(_Body):
    status: Literal["ready"]


class WorkerStatus(_Body):
    pid: int
    rss_bytes: int | None = Field(None, description="Resident memory of the worker process.")
    pss_bytes: int | None = Field(
        None, description="Proportional memory: pages shared with other workers (mmapped weights) split between them."
    )


class InstanceStatus(_Body):
    id: str
    model: str
    state: Literal["loading", "idle", "busy", "error", "closed"]
    context_tokens: int = Field(description="Tokens the instance holds in its context (its last prompt and answer).")
    context_size: int | None = Field(
        description="The instance's context window in tokens (null before it loaded, or for engines without one)."
    )
    created: int
    last_used: int
    age_seconds: float
    idle_seconds: float
    requests_served: int
    slots: int = Field(description="Requests the instance serves at once (the model's `slots`; 1 for most).")
    active_requests: int = Field(description="Requests it is serving now (0 when idle).")
    error: str | None
    isolation: Literal["process", "thread"] = Field(description="Where the engine runs.")
    worker: WorkerStatus | None = Field(description="The worker process (isolation: process), while it lives.")
    placement: dict[str, Any] | None = Field(
        description="Where the engine runs and what it holds, as its library reports it once loaded: backend, "
        "device, layers offloaded of the total, context size, KV cache types, buffers and device memory (llama.cpp), "
        "compute type (CTranslate2), dtype or execution providers (sentence-transformers); `notes` says what it "
        "could not honour (offload asked of a build without a GPU backend)."
    )
    memory_estimate_bytes: int | None = Field(
        description="What the memory budget holds for this instance (null before its estimate is known)."
    )
    memory_estimate_source: Literal["declared", "estimated", "measured", "files"] | None = Field(
        description="Where that figure comes from: the config's memory_estimate, the engine's estimate (GGUF "
        "metadata), the measured memory of the model's first instance, or the weights' size on disk."
    )
    waiting_for_memory: bool = Field(description="A loading instance waiting for room in the memory budget.")


class PoolStatus(_Body):
    instances: list[InstanceStatus]
    waiting: int = Field(description="Requests queued for the model: waiting for an instance or for a batch.")
    min_instances: int
    max_instances: int
    last_error: str | None
    batches_run: int | None = Field(None, description="Embedding models: engine batches run so far.")


class ModelStatus(PoolStatus):
    engine: str
    task: ModelTask  # every task there is, so a new one cannot be missed here
    serves: list[str] = Field(description="The kinds of request the model takes (chat, completion, ...).")
    features: list[str] = Field(description="The optional features its engine honours (n, logprobs, tools, ...).")
    state: Literal["busy", "ready", "loading", "error", "unloaded"]


class RetiringStatus(PoolStatus):
    model: str


class Concurrency(_Body):
    limit: int
    in_use: int


class Eviction(_Body):
    instance: str
    model: str
    bytes: int = Field(description="What it held in the budget.")
    for_: str = Field(alias="for", description="The instance whose load needed the room.")
    at: int = Field(description="Unix time.")


class Memory(_Body):
    budget_bytes: int = Field(description="memory_budget in bytes.")
    used_bytes: int = Field(description="The estimates of every instance loaded, loading or being disposed.")
    loads_waiting: int = Field(description="Instance loads waiting for room.")
    evictions: int = Field(description="Idle instances disposed to make room, since start.")
    recent_evictions: list[Eviction]


class Status(_Body):
    """What the daemon is doing: every model's instances and queue, downloads, uptime."""

    name: Literal["lllmsd"]
    version: str
    uptime_seconds: float
    concurrency: Concurrency
    memory: Memory = Field(description="The memory budget shared by every model (see docs/accelerators.md).")
    models: dict[str, ModelStatus]
    retiring: list[RetiringStatus]
    downloads: list[dict[str, Any]] = Field(description="Downloads under way or failed, per file.")
