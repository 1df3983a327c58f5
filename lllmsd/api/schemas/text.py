"""Chat completions and (legacy) completions: requests, their conversion to core tasks, and rendering.

Requests are validated here; the rendering functions turn core events/results into the exact OpenAI
shapes (shared/OPENAI-WIRE.md). Nothing below the API layer sees these classes.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from lllmsd.api.schemas.common import WireRequest, response_id, system_fingerprint
from lllmsd.core.tasks import (
    ChatMessage,
    ChatTask,
    ChoiceEnd,
    CompletionTask,
    GenerationEvent,
    GenerationResult,
    ResponseFormat,
    Sampling,
    TextDelta,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
    Usage,
)
from lllmsd.errors import InvalidRequest

MAX_N = 16
MAX_STOP = 16
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


# ------------------------------------------------------------------------------------------ requests


class TextPart(WireRequest):
    type: Literal["text"]
    text: str


class FunctionCallWire(WireRequest):
    name: str
    arguments: str


class ToolCallWire(WireRequest):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallWire


# ------------------------------------------------------------------------- JSON Schema of the validators
# The model validators below check things a type cannot say. These additions say them in the JSON Schema
# too (GET /openapi.json), so the document describes what is accepted and generated requests (fuzzing,
# client code generators) are not refused for reasons the document hides. Validation is unchanged.

JsonSchema = dict[str, Any]


def _when(condition: JsonSchema, then: JsonSchema) -> JsonSchema:
    return {"if": condition, "then": then}


def _present(name: str, schema: JsonSchema) -> JsonSchema:
    return {"required": [name], "properties": {name: schema}}


def _add_rules(*rules: JsonSchema) -> Any:
    def extra(schema: JsonSchema) -> None:
        schema.setdefault("allOf", []).extend(rules)

    return extra


def _array_branch(*, min_items: int | None = None, max_items: int | None = None, item: JsonSchema | None = None) -> Any:
    """Constraints for the array option of a ``str | list[...]`` field."""

    def extra(schema: JsonSchema) -> None:
        for option in schema.get("anyOf", [schema]):
            if option.get("type") == "array":
                option.update({k: v for k, v in (("minItems", min_items), ("maxItems", max_items)) if v is not None})
                option["items"] = {**option.get("items", {}), **(item or {})}
            elif option.get("type") == "string" and item:
                option.update(item)

    return extra


def _token_map(schema: JsonSchema) -> None:
    for option in schema.get("anyOf", [schema]):
        if option.get("type") == "object":
            option["propertyNames"] = {"pattern": r"^-?[0-9]+$"}
            option["additionalProperties"] = {"type": "number", "minimum": -100, "maximum": 100}


_STREAM_OPTIONS_NEED_STREAM = _when(_present("stream_options", {"type": "object"}), _present("stream", {"const": True}))


class MessageWire(WireRequest):
    model_config = ConfigDict(
        json_schema_extra=_add_rules(
            {
                "if": {"properties": {"role": {"const": "assistant"}}},
                "else": _present("content", {"not": {"type": "null"}}),
            },
            _when(
                {"properties": {"role": {"const": "tool"}}},
                _present("tool_call_id", {"type": "string", "minLength": 1}),
            ),
        )
    )

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallWire] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _content_present(self) -> MessageWire:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        return self

    def prompt_chars(self) -> int:
        """Characters this message adds to the prompt (for ``max_prompt_chars``)."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or ())
        calls = sum(len(c.function.name) + len(c.function.arguments) for c in self.tool_calls or ())
        return len(content) + calls

    def to_message(self) -> ChatMessage:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in self.tool_calls or ())
        role = "system" if self.role == "developer" else self.role
        return ChatMessage(role=role, content=content, name=self.name, tool_calls=calls, tool_call_id=self.tool_call_id)


class FunctionWire(WireRequest):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolWire(WireRequest):
    type: Literal["function"]
    function: FunctionWire


class NamedFunction(WireRequest):
    name: str


class NamedToolChoice(WireRequest):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaSpec(WireRequest):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormatText(WireRequest):
    type: Literal["text"]


class ResponseFormatJsonObject(WireRequest):
    type: Literal["json_object"]
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # llama-cpp-python's extension


class ResponseFormatJsonSchema(WireRequest):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormatWire = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema, Field(discriminator="type")
]


class StreamOptions(WireRequest):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted for SDK compatibility; there is nothing to obfuscate


class SamplingWire(WireRequest):
    """Fields chat and completions share, including llama.cpp's non-spec samplers."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = Field(
        None, json_schema_extra=_array_branch(max_items=MAX_STOP, item={"minLength": 1})
    )
    seed: int | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, json_schema_extra=_token_map)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # not in OpenAI's spec; what llama.cpp servers accept
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0)
    repeat_last_n: int | None = Field(None, ge=0)
    grammar: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.lstrip("-").isdigit():
                raise ValueError(f"keys are token ids, got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias for token {token} must be within [-100, 100]")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingWire:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    def sampling(self, max_tokens: int | None, defaults: Any, *, requested: bool) -> Sampling:
        """``requested``: max_tokens is the client's own value, not a default."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        bias = {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None
        sampling = Sampling(
            max_tokens=max_tokens,
            strict_max_tokens=requested and max_tokens is not None,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            repeat_last_n=self.repeat_last_n,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            seed=self.seed,
            stop=tuple(stops),
            logit_bias=bias,
        )
        return defaults.apply(sampling) if defaults is not None else sampling

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def resolve_grammar(self, config: Any) -> str | None:
        """An inline GBNF grammar, or the name of one of the model's configured grammars."""
        if self.grammar is None:
            return None
        named = getattr(config, "grammars", None) or {}
        return named.get(self.grammar, self.grammar)


class ChatCompletionRequest(SamplingWire):
    model_config = ConfigDict(
        json_schema_extra=_add_rules(
            _STREAM_OPTIONS_NEED_STREAM,
            _when(_present("top_logprobs", {"type": "integer"}), _present("logprobs", {"const": True})),
            _when(
                _present("tool_choice", {"enum": ["auto", "required"]}),
                _present("tools", {"type": "array", "minItems": 1}),
            ),
        )
    )

    model: str
    messages: list[MessageWire] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormatWire | None = None
    tools: list[ToolWire] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or ()}
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names '{self.tool_choice.function.name}', which is not in tools")
        elif self.tool_choice in ("auto", "required") and not self.tools:
            raise ValueError(f"tool_choice '{self.tool_choice}' needs tools")
        return self

    def to_task(self, config: Any) -> ChatTask:
        max_tokens = self.max_completion_tokens or self.max_tokens
        _check_count("messages", len(self.messages), getattr(config, "max_messages", None), "max_messages")
        _check_prompt_chars(config, "messages", sum(m.prompt_chars() for m in self.messages))
        _check_max_tokens(config, "max_completion_tokens" if self.max_completion_tokens else "max_tokens", max_tokens)
        if isinstance(self.tool_choice, NamedToolChoice):
            tool_choice: str | None = self.tool_choice.function.name
        else:
            tool_choice = self.tool_choice
        fmt = None
        if isinstance(self.response_format, ResponseFormatJsonSchema):
            spec = self.response_format.json_schema
            fmt = ResponseFormat("json_schema", spec.schema_ or {}, spec.name, spec.strict)
        elif isinstance(self.response_format, ResponseFormatJsonObject):
            fmt = ResponseFormat("json_object", self.response_format.schema_)
        elif isinstance(self.response_format, ResponseFormatText):
            fmt = ResponseFormat("text")
        return ChatTask(
            messages=tuple(m.to_message() for m in self.messages),
            sampling=self.sampling(max_tokens, getattr(config, "completion_defaults", None), requested=True),
            n=self.n,
            tools=tuple(
                ToolSpec(t.function.name, t.function.description, t.function.parameters) for t in self.tools or ()
            ),
            tool_choice=tool_choice,
            parallel_tool_calls=self.parallel_tool_calls if self.parallel_tool_calls is not None else True,
            response_format=fmt,
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs or 0,
            grammar=self.resolve_grammar(config),
        )


class CompletionRequest(SamplingWire):
    model_config = ConfigDict(
        json_schema_extra=_add_rules(
            _STREAM_OPTIONS_NEED_STREAM,
            _when(
                {
                    "required": ["best_of", "stream"],
                    "properties": {"best_of": {"minimum": 2}, "stream": {"const": True}},
                },
                {"not": {}},  # best_of cannot be streamed
            ),
        )
    )

    model: str
    prompt: str | list[str] = Field(json_schema_extra=_array_branch(min_items=1, max_items=1))
    max_tokens: int | None = Field(None, ge=1)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=5)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("give one prompt (a string); batches of prompts are not supported")
        return value

    @model_validator(mode="after")
    def _best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be >= n ({self.n})")
        if self.best_of is not None and self.best_of > 1 and self.stream:
            raise ValueError("best_of cannot be streamed")
        return self

    def to_task(self, config: Any) -> CompletionTask:
        prompt_chars = sum(len(p) for p in ([self.prompt] if isinstance(self.prompt, str) else self.prompt))
        _check_prompt_chars(config, "prompt", prompt_chars + len(self.suffix or ""))
        _check_max_tokens(config, "max_tokens", self.max_tokens)  # an explicit one: the default fits any context
        defaults = getattr(config, "completion_defaults", None)
        max_tokens = self.max_tokens or (defaults.max_tokens if defaults else None) or COMPLETIONS_DEFAULT_MAX_TOKENS
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        return CompletionTask(
            prompt=prompt,
            sampling=self.sampling(max_tokens, defaults, requested=self.max_tokens is not None),
            n=self.n,
            best_of=self.best_of,
            echo=self.echo,
            suffix=self.suffix,
            logprobs=self.logprobs,
            grammar=self.resolve_grammar(config),
        )


# ------------------------------------------------------------------------------------- request limits
# Checked before the request queues, so an oversized request costs no tokenizing and no instance.


def _check_count(param: str, count: int, limit: int | None, setting: str) -> None:
    if limit is not None and count > limit:
        raise InvalidRequest(
            f"{param} has {count} items; this model takes at most {limit} per request ({setting})",
            param=param,
            code="invalid_value",
        )


def _check_prompt_chars(config: Any, param: str, chars: int) -> None:
    limit = getattr(config, "max_prompt_chars", None)
    if limit is not None and chars > limit:
        raise InvalidRequest(
            f"the prompt has {chars} characters; this model takes at most {limit} per request (max_prompt_chars)",
            param=param,
            code="invalid_value",
        )


def _check_max_tokens(config: Any, param: str, max_tokens: int | None) -> None:
    """A max_tokens that cannot fit even with a one-token prompt (the engine checks the real prompt)."""
    context = getattr(config, "context_size", None)
    if max_tokens is not None and context is not None and max_tokens >= context:
        raise InvalidRequest(
            f"{param} is {max_tokens}, but this model's maximum context length is {context} tokens, "
            "which must also hold the prompt",
            param=param,
            code="context_length_exceeded",
        )


# ----------------------------------------------------------------------------------------- rendering


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def _chat_logprobs(logprobs: tuple[TokenLogprob, ...]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": list(lp.bytes) if lp.bytes is not None else None,
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes) if t.bytes is not None else None}
                    for t in lp.top
                ],
            }
            for lp in logprobs
        ],
        "refusal": None,
    }


def _completion_logprobs(logprobs: tuple[TokenLogprob, ...]) -> dict[str, Any]:
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in logprobs],
        "text_offset": [lp.text_offset for lp in logprobs],
    }


class ResponseHeader:
    """The fields every response and chunk of one answer repeat."""

    def __init__(self, prefix: str, model: str, engine: str, instance_id: str | None) -> None:
        self.id = response_id(prefix, instance_id)
        self.created = int(time.time())
        self.model = model
        self.system_fingerprint = system_fingerprint(engine)

    def fields(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.system_fingerprint,
        }


def chat_response(header: ResponseHeader, result: GenerationResult, logprobs: bool) -> dict[str, Any]:
    choices = []
    for choice in result.choices:
        message: dict[str, Any] = {"role": "assistant", "content": choice.text, "refusal": None}
        if choice.tool_calls:
            message["content"] = choice.text or None
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in choice.tool_calls
            ]
        choices.append(
            {
                "index": choice.index,
                "message": message,
                "logprobs": _chat_logprobs(choice.logprobs) if logprobs else None,
                "finish_reason": choice.finish_reason or "stop",
            }
        )
    return {**header.fields("chat.completion"), "choices": choices, "usage": usage_body(result.usage)}


def completion_response(header: ResponseHeader, result: GenerationResult, logprobs: bool) -> dict[str, Any]:
    choices = [
        {
            "text": choice.text,
            "index": choice.index,
            "logprobs": _completion_logprobs(choice.logprobs) if logprobs else None,
            "finish_reason": choice.finish_reason or "stop",
        }
        for choice in result.choices
    ]
    return {**header.fields("text_completion"), "choices": choices, "usage": usage_body(result.usage)}


async def chat_chunks(
    header: ResponseHeader, events: AsyncIterator[GenerationEvent], n: int, logprobs: bool, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    """Chat completion chunks in the order OpenAI sends them (role first, empty delta with the finish)."""
    base = header.fields("chat.completion.chunk")
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, lps: Any = None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": lps, "finish_reason": finish}
        return {**base, "choices": [choice], **extra}

    # The engine's first event comes before the role chunks: an error it raises at once (context too
    # long) must reach the client before any chunk does, so it can still be an HTTP status.
    first = await anext(events, None)
    for index in range(n):
        yield chunk(index, {"role": "assistant", "content": "", "refusal": None})
    async for event in _prepend(first, events):
        if isinstance(event, TextDelta):
            if event.text or event.logprobs:
                lps = _chat_logprobs(event.logprobs) if logprobs else None
                yield chunk(event.choice, {"content": event.text}, lps=lps)
        elif isinstance(event, ToolCallDelta):
            call: dict[str, Any] = {"index": event.call_index}
            if event.id is not None:
                call.update(id=event.id, type="function")
            function: dict[str, Any] = {"arguments": event.arguments}
            if event.name is not None:
                function["name"] = event.name
            call["function"] = function
            yield chunk(event.choice, {"tool_calls": [call]})
        elif isinstance(event, ChoiceEnd):
            yield chunk(event.choice, {}, event.finish_reason)
        elif isinstance(event, Usage) and include_usage:
            yield {**base, "choices": [], "usage": usage_body(event)}


async def _prepend(
    first: GenerationEvent | None, rest: AsyncIterator[GenerationEvent]
) -> AsyncIterator[GenerationEvent]:
    if first is not None:
        yield first
    async for event in rest:
        yield event


async def completion_chunks(
    header: ResponseHeader, events: AsyncIterator[GenerationEvent], logprobs: bool, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    base = header.fields("text_completion")
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, text: str, finish: str | None = None, lps: Any = None) -> dict[str, Any]:
        return {**base, "choices": [{"text": text, "index": index, "logprobs": lps, "finish_reason": finish}], **extra}

    async for event in events:
        if isinstance(event, TextDelta):
            yield chunk(event.choice, event.text, lps=_completion_logprobs(event.logprobs) if logprobs else None)
        elif isinstance(event, ChoiceEnd):
            yield chunk(event.choice, "", event.finish_reason)
        elif isinstance(event, Usage) and include_usage:
            yield {**base, "choices": [], "usage": usage_body(event)}


def tool_arguments_json(arguments: str) -> str:
    """Arguments as compact JSON when they parse (models emit compact JSON; keep integers integers)."""
    try:
        return json.dumps(json.loads(arguments), separators=(",", ":"), ensure_ascii=False)
    except ValueError:
        return arguments


def reject_unsupported_task(model_id: str, wanted: str, task: str) -> InvalidRequest:
    return InvalidRequest(f"model '{model_id}' is a {task} model and cannot serve {wanted}", param="model")
