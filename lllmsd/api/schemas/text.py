"""Chat completions and (legacy) completions requests: validation, limits, and conversion to core jobs.

``ChatCompletionRequest`` and ``CompletionRequest`` are what the handlers in api/text.py validate request
bodies with; ``SamplingWire`` holds the fields they share. ``to_job`` turns a request into the core job
after the per-request limits of the model's config (max_messages, max_prompt_chars, the context size)
are checked, so an oversized request is refused before it queues. The message, tool and response-format
parts of a chat request are in messages.py; rendering the answers is in text_output.py. Nothing below
the API layer sees these classes.

Integer fields are range-checked here, so no value wraps silently in an engine's C types: ``top_k`` and
the token counts fit an int32 (2**31 - 1), ``seed`` an int64 (OpenAI's range; each engine maps it to its
own seed width and says how), ``repeat_last_n`` is at most 1,048,576 (and the model's context: the
engine checks that). ``logit_bias`` keys are ASCII token ids (at most 1,024 of them), values within
[-100, 100]. The JSON Schemas a chat request brings are bounded by json_schema.py.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from lllmsd.api.schemas.common import WireRequest
from lllmsd.api.schemas.embeddings import check_tokens, is_token
from lllmsd.api.schemas.json_schema import SchemaBudget
from lllmsd.api.schemas.messages import (
    MessageWire,
    NamedToolChoice,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
    ResponseFormatText,
    ResponseFormatWire,
    ToolWire,
)
from lllmsd.api.schemas.rules import add_rules, array_branch, present, token_map, when
from lllmsd.api.schemas.tokens import decode_openai_ids, reads_openai_ids
from lllmsd.core.jobs import ChatJob, CompletionJob, ResponseFormat, Sampling, ToolSpec
from lllmsd.errors import InvalidRequest

MAX_N = 16
MAX_STOP = 16
MAX_TOOLS = 128  # OpenAI's limit
MAX_INT32 = 2**31 - 1  # token counts, top_k: what llama.cpp and the other engines take as int32
SEED_RANGE = (-(2**63), 2**63 - 1)  # OpenAI's (int64)
MAX_REPEAT_LAST_N = 1_048_576  # and at most the model's context (the engine checks)
MAX_LOGIT_BIAS = 1_024  # entries; OpenAI takes 300
MAX_GRAMMAR_CHARS = 65_536  # as the llama-cpp engine's own bound (engines/llama_cpp/gbnf.py)
_TOKEN_ID = re.compile(r"[0-9]{1,9}")  # no vocabulary comes near a billion tokens
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_PROMPTS = 128  # prompts one completions request may batch (each generates n choices)
_PROMPT_FORMS = "a string, an array of strings, an array of token ids or an array of token-id arrays"

_STREAM_OPTIONS_NEED_STREAM = when(present("stream_options", {"type": "object"}), present("stream", {"const": True}))


class StreamOptions(WireRequest):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted for SDK compatibility; there is nothing to obfuscate


class SamplingWire(WireRequest):
    """Fields chat and completions share, including llama.cpp's non-spec samplers."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = Field(
        None, json_schema_extra=array_branch(max_items=MAX_STOP, item={"minLength": 1})
    )
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS, json_schema_extra=token_map)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # not in OpenAI's spec; what llama.cpp servers accept
    top_k: int | None = Field(None, ge=0, le=MAX_INT32)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0)
    repeat_last_n: int | None = Field(None, ge=0, le=MAX_REPEAT_LAST_N)
    # GBNF text or a configured grammar's name; the engine bounds the grammar itself (llama-cpp: gbnf.py)
    grammar: str | None = Field(None, max_length=MAX_GRAMMAR_CHARS)

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
            # ASCII digits only: str.isdigit() takes "²", which int() then refuses (a 500)
            if not _TOKEN_ID.fullmatch(token):
                raise ValueError(f"keys are token ids (non-negative integers), got {token[:20]!r}")
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
        json_schema_extra=add_rules(
            _STREAM_OPTIONS_NEED_STREAM,
            when(present("top_logprobs", {"type": "integer"}), present("logprobs", {"const": True})),
            when(
                present("tool_choice", {"enum": ["auto", "required"]}),
                present("tools", {"type": "array", "minItems": 1}),
            ),
        )
    )

    model: str
    messages: list[MessageWire] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormatWire | None = None
    tools: list[ToolWire] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    # OpenAI's, for reasoning models; here a variable of the model's chat template (where it reads one)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    # not in OpenAI's spec; what llama.cpp's server and vLLM accept: extra chat template variables
    chat_template_kwargs: dict[str, Any] | None = Field(None, max_length=64)

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

    def check_schemas(self) -> None:
        """The JSON Schemas of this request within their limits (json_schema.py): they share one budget."""
        budget = SchemaBudget()
        fmt = self.response_format
        if isinstance(fmt, ResponseFormatJsonSchema):
            budget.check(fmt.json_schema.schema_, "response_format.json_schema.schema")
        elif isinstance(fmt, ResponseFormatJsonObject):
            budget.check(fmt.schema_, "response_format.schema")
        for index, tool in enumerate(self.tools or ()):
            budget.check(tool.function.parameters, f"tools[{index}].function.parameters")

    def to_job(self, config: Any) -> ChatJob:
        max_tokens = self.max_completion_tokens or self.max_tokens
        _check_count("messages", len(self.messages), getattr(config, "max_messages", None), "max_messages")
        _check_prompt_chars(config, "messages", sum(m.prompt_chars() for m in self.messages))
        _check_max_tokens(config, "max_completion_tokens" if self.max_completion_tokens else "max_tokens", max_tokens)
        self.check_schemas()
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
        return ChatJob(
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
            stream=self.stream,
            template_kwargs=self.chat_template_kwargs or None,
            reasoning_effort=self.reasoning_effort,
        )


class CompletionRequest(SamplingWire):
    model_config = ConfigDict(
        json_schema_extra=add_rules(
            _STREAM_OPTIONS_NEED_STREAM,
            when(
                {
                    "required": ["best_of", "stream"],
                    "properties": {"best_of": {"minimum": 2}, "stream": {"const": True}},
                },
                {"not": {}},  # best_of cannot be streamed
            ),
        )
    )

    model: str
    # one prompt, or a batch (OpenAI's four forms: a string, strings, token ids, token-id lists)
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        json_schema_extra=array_branch(min_items=1, max_items=MAX_PROMPTS)
    )
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=5)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, value: Any) -> Any:
        """Sizes first, one clear message per mistake (pydantic's would list four failed union branches)."""
        if not isinstance(value, list):
            return value
        if not value:
            raise ValueError("must not be an empty array")
        if is_token(value[0]):
            check_tokens(value, "prompt")
            return value
        if len(value) > MAX_PROMPTS:
            raise ValueError(f"has {len(value)} prompts; a request may have at most {MAX_PROMPTS}")
        if isinstance(value[0], list):
            for index, tokens in enumerate(value):
                if not isinstance(tokens, list):
                    raise ValueError(f"must be {_PROMPT_FORMS}")
                check_tokens(tokens, f"prompt[{index}]")
        elif not all(isinstance(item, str) for item in value):
            raise ValueError(f"must be {_PROMPT_FORMS}")
        return value

    def prompts(self) -> list[str | tuple[int, ...]]:
        """The prompts of this request, each a text or token ids."""
        value = self.prompt
        if isinstance(value, str):
            return [value]
        if is_token(value[0]):
            return [tuple(value)]  # type: ignore[arg-type] - one array of token ids is one prompt
        return [item if isinstance(item, str) else tuple(item) for item in value]  # type: ignore[misc]

    def has_token_ids(self) -> bool:
        return any(not isinstance(prompt, str) for prompt in self.prompts())

    @model_validator(mode="after")
    def _best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be >= n ({self.n})")
        if self.best_of is not None and self.best_of > 1 and self.stream:
            raise ValueError("best_of cannot be streamed")
        return self

    def to_job(self, config: Any) -> CompletionJob:
        """The job of the first (usually only) prompt."""
        return self.to_jobs(config)[0]

    def to_jobs(self, config: Any) -> list[CompletionJob]:
        """One job per prompt, in order; each generates ``n`` choices (``best_of`` candidates) of its own."""
        prompts = self.prompts()
        texts = [
            prompt if isinstance(prompt, str) else self._prompt_text(prompt, config, index, len(prompts))
            for index, prompt in enumerate(prompts)
        ]
        prompt_chars = sum(len(text) for text in texts)
        _check_prompt_chars(config, "prompt", prompt_chars + len(self.suffix or "") * len(texts))
        _check_max_tokens(config, "max_tokens", self.max_tokens)  # an explicit one: the default fits any context
        defaults = getattr(config, "completion_defaults", None)
        max_tokens = self.max_tokens or (defaults.max_tokens if defaults else None) or COMPLETIONS_DEFAULT_MAX_TOKENS
        sampling = self.sampling(max_tokens, defaults, requested=self.max_tokens is not None)
        grammar = self.resolve_grammar(config)
        return [
            CompletionJob(
                prompt=text,
                sampling=sampling,
                n=self.n,
                best_of=self.best_of,
                echo=self.echo,
                suffix=self.suffix,
                logprobs=self.logprobs,
                grammar=grammar,
            )
            for text in texts
        ]

    def _prompt_text(self, tokens: tuple[int, ...], config: Any, index: int, count: int) -> str:
        param = "prompt" if count == 1 and is_token(self.prompt[0]) else f"prompt[{index}]"  # type: ignore[index]
        if not reads_openai_ids(config):
            raise InvalidRequest(
                f"{param}: this model reads token ids in its own vocabulary (token_ids: model), which only "
                "embeddings support; send the prompt as text",
                param=param,
                code="invalid_value",
            )
        return decode_openai_ids(tokens, param)


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
