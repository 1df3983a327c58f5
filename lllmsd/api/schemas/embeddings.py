"""POST /v1/embeddings: the request, its conversion to an EmbeddingJob, and the response.

``input`` is a string, an array of strings, one array of token ids, or an array of token-id arrays
(OpenAI's four forms). Token ids belong to the model's own tokenizer: the engine decodes them. Empty
strings and empty arrays are refused, as OpenAI does. ``encoding_format: base64`` is the little-endian
float32 bytes of each vector, base64-encoded; recent openai-python asks for it by default and decodes it.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from lllmsd.api.schemas.common import WireRequest
from lllmsd.core.jobs import EmbeddingJob, EmbeddingResult
from lllmsd.errors import InvalidRequest

_FORMS = "a string, an array of strings, an array of token ids or an array of token-id arrays"

EmbeddingInput = str | list[str] | list[int] | list[list[int]]


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_tokens(tokens: list[Any], where: str) -> None:
    if not tokens:
        raise ValueError(f"{where} is an empty array")
    for position, token in enumerate(tokens):
        if not _is_token(token):
            raise ValueError(f"{where}[{position}] must be a token id (an integer), got {token!r}")
        if token < 0:
            raise ValueError(f"{where}[{position}] is a negative token id ({token})")


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
            return value
        if not isinstance(value, list):
            raise ValueError(f"must be {_FORMS}")
        if not value:
            raise ValueError("must not be an empty array")
        if all(isinstance(item, str) for item in value):
            empty = next((i for i, item in enumerate(value) if not item), None)
            if empty is not None:
                raise ValueError(f"input[{empty}] is an empty string")
        elif all(_is_token(item) for item in value):
            _check_tokens(value, "input")
        elif all(isinstance(item, list) for item in value):
            for index, tokens in enumerate(value):
                _check_tokens(tokens, f"input[{index}]")
        else:
            raise ValueError(f"must be {_FORMS}")
        return value

    def inputs(self) -> tuple[str | tuple[int, ...], ...]:
        value = self.input
        if isinstance(value, str):
            return (value,)
        if value and _is_token(value[0]):
            return (tuple(value),)  # type: ignore[arg-type] - one array of token ids is one input
        return tuple(item if isinstance(item, str) else tuple(item) for item in value)  # type: ignore[misc]

    def to_job(self, config: Any) -> EmbeddingJob:
        inputs = self.inputs()
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
