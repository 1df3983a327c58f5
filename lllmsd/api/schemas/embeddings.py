"""POST /v1/embeddings: the request, its conversion to an EmbeddingJob, and the response.

``input`` is a string, an array of strings, one array of token ids, or an array of token-id arrays
(OpenAI's four forms). Token ids are OpenAI's cl100k_base ids, as OpenAI clients mean them, decoded to
text here (tokens.py); a model configured with ``token_ids: model`` reads them in its own vocabulary
(the engine decodes them). Empty
strings and empty arrays are refused, as OpenAI does. ``encoding_format: base64`` is the little-endian
float32 bytes of each vector, base64-encoded; recent openai-python asks for it by default and decodes it.

Size bounds, checked while validating and before anything is built from the input (4,000,000 token ids
are refused by their count, not after a pass over them):
- token ids: at most 8,192 per input and 300,000 per request (OpenAI's limits), each below 2**31;
- text: at most 100,000 characters per input and 1,500,000 per request. OpenAI counts tokens; counting
  characters is the cheap proxy here (a token is rarely more than a dozen characters, and about 4 in
  English, so 8,192 and 300,000 tokens fit). What a model actually reads is bounded by its own context:
  a longer input is cut to it (``truncate``, the default) or refused.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from lllmsd.api.schemas.common import WireRequest
from lllmsd.api.schemas.tokens import decode_openai_ids, reads_openai_ids
from lllmsd.core.jobs import EmbeddingJob, EmbeddingResult
from lllmsd.errors import InvalidRequest

_FORMS = "a string, an array of strings, an array of token ids or an array of token-id arrays"
MAX_INPUT_TOKENS = 8_192  # token ids per input (OpenAI's limit)
MAX_REQUEST_TOKENS = 300_000  # token ids per request (OpenAI's limit)
MAX_INPUT_CHARS = 100_000  # characters per text input
MAX_REQUEST_CHARS = 1_500_000  # characters per request
MAX_TOKEN_ID = 2**31 - 1

EmbeddingInput = str | list[str] | list[int] | list[list[int]]


def is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_tokens(tokens: list[Any], where: str) -> None:
    if not tokens:
        raise ValueError(f"{where} is an empty array")
    if len(tokens) > MAX_INPUT_TOKENS:
        raise ValueError(f"{where} has {len(tokens)} token ids; an input may have at most {MAX_INPUT_TOKENS}")
    for position, token in enumerate(tokens):
        if not is_token(token):
            raise ValueError(f"{where}[{position}] must be a token id (an integer), got {str(token)[:40]!r}")
        if token < 0:
            raise ValueError(f"{where}[{position}] is a negative token id ({str(token)[:40]})")
        if token > MAX_TOKEN_ID:
            raise ValueError(f"{where}[{position}] is not a token id: {str(token)[:40]} is above 2**31 - 1")


def _check_texts(texts: list[str]) -> None:
    total = 0
    for index, text in enumerate(texts):
        if not text:
            raise ValueError(f"input[{index}] is an empty string")
        if len(text) > MAX_INPUT_CHARS:
            raise ValueError(
                f"input[{index}] has {len(text)} characters; an input may have at most {MAX_INPUT_CHARS:,}"
            )
        total += len(text)
        if total > MAX_REQUEST_CHARS:
            raise ValueError(f"the inputs have more than {MAX_REQUEST_CHARS:,} characters in all")


class EmbeddingRequest(WireRequest):
    model: str
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, value: Any) -> Any:
        """One clear message per mistake, instead of pydantic's four failed union branches."""
        if isinstance(value, str):
            if not value:
                raise ValueError("must not be an empty string")
            if len(value) > MAX_INPUT_CHARS:
                raise ValueError(f"has {len(value)} characters; an input may have at most {MAX_INPUT_CHARS:,}")
            return value
        if not isinstance(value, list):
            raise ValueError(f"must be {_FORMS}")
        if not value:
            raise ValueError("must not be an empty array")
        # the form is the first item's; sizes are checked before any pass over the items
        if isinstance(value[0], str):
            if not all(isinstance(item, str) for item in value):
                raise ValueError(f"must be {_FORMS}")
            _check_texts(value)
        elif is_token(value[0]):
            if len(value) <= MAX_INPUT_TOKENS and not all(is_token(item) for item in value):
                raise ValueError(f"must be {_FORMS}")
            check_tokens(value, "input")
        elif isinstance(value[0], list):
            total = 0
            for index, tokens in enumerate(value):
                if not isinstance(tokens, list):
                    raise ValueError(f"must be {_FORMS}")
                total += len(tokens)
                if len(tokens) <= MAX_INPUT_TOKENS and total > MAX_REQUEST_TOKENS:  # a longer one: its own message
                    raise ValueError(f"the inputs have more than {MAX_REQUEST_TOKENS:,} token ids in all")
                check_tokens(tokens, f"input[{index}]")
        else:
            raise ValueError(f"must be {_FORMS}")
        return value

    def inputs(self) -> tuple[str | tuple[int, ...], ...]:
        value = self.input
        if isinstance(value, str):
            return (value,)
        if value and is_token(value[0]):
            return (tuple(value),)  # type: ignore[arg-type] - one array of token ids is one input
        return tuple(item if isinstance(item, str) else tuple(item) for item in value)  # type: ignore[misc]

    def has_token_ids(self) -> bool:
        return any(not isinstance(item, str) for item in self.inputs())

    def to_job(self, config: Any) -> EmbeddingJob:
        inputs = self.inputs()
        if reads_openai_ids(config):
            one = len(inputs) == 1 and not isinstance(self.input, str) and is_token(self.input[0])
            inputs = tuple(
                item if isinstance(item, str) else decode_openai_ids(item, "input" if one else f"input[{index}]")
                for index, item in enumerate(inputs)
            )
        limit = getattr(config, "max_inputs", None)
        if limit is not None and len(inputs) > limit:
            raise InvalidRequest(
                f"input has {len(inputs)} items; this model takes at most {limit} per request",
                param="input",
                code="invalid_value",
            )
        return EmbeddingJob(inputs=inputs, dimensions=self.dimensions)


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return np.asarray(vector, dtype=np.float32).tolist()


def embedding_response(model: str, result: EmbeddingResult, encoding_format: str) -> dict[str, Any]:
    tokens = int(sum(result.token_counts))
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": encode_vector(vector, encoding_format)}
            for index, vector in enumerate(result.vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
