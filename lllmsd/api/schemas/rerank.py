"""POST /v1/rerank (also /rerank and /v2/rerank): the request, its conversion to a RerankJob, the response.

Not an OpenAI endpoint: the shape llama-server, vLLM and infinity serve and Cohere and Jina clients send.
Request ``{model, query, documents: [string | {text}], top_n, return_documents}``; response ``{id, model,
results: [{index, relevance_score, document?: {text}}], usage: {total_tokens}}``, results sorted by score
(highest first; equal scores keep the documents' order), ``index`` pointing into the request's documents.

``top_n`` larger than the number of documents returns them all, as Cohere and Jina do; ``return_documents``
defaults to true, as vLLM, llama-server and Jina do (Cohere's v2 API never returns them: send false).

Bounds, checked while validating and before any work: the query and each document are non-empty and at
most 100,000 characters, 1,500,000 in all (the embeddings endpoint's bounds); the number of documents is
bounded by the model's ``max_rerank_documents`` (``to_job``). What the model reads of each is bounded by
its own context: a longer pair is cut to it (``truncate``, the default) or refused, naming the document.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, WithJsonSchema, field_validator

from lllmsd.api.schemas.common import WireRequest, response_id
from lllmsd.api.schemas.embeddings import MAX_INPUT_CHARS, MAX_REQUEST_CHARS
from lllmsd.core.jobs import RerankJob, RerankResult
from lllmsd.errors import InvalidRequest

_FORMS = "an array of strings or of objects with a string 'text'"
_DOCUMENTS_SCHEMA = {
    "type": "array",
    "minItems": 1,
    "items": {
        "anyOf": [
            {"type": "string", "minLength": 1, "maxLength": MAX_INPUT_CHARS},
            {
                "type": "object",
                "properties": {"text": {"type": "string", "minLength": 1, "maxLength": MAX_INPUT_CHARS}},
                "required": ["text"],
                "additionalProperties": False,
            },
        ]
    },
    "description": "The documents to rank: strings, or objects with a 'text'.",
}


def _document_text(index: int, item: Any) -> str:
    if isinstance(item, dict):
        if set(item) != {"text"} or not isinstance(item["text"], str):
            raise ValueError(f"documents[{index}] must be a string or an object with only a string 'text'")
        item = item["text"]
    if not isinstance(item, str):
        raise ValueError(f"must be {_FORMS}; documents[{index}] is not")
    if not item:
        raise ValueError(f"documents[{index}] is an empty string")
    if len(item) > MAX_INPUT_CHARS:
        raise ValueError(
            f"documents[{index}] has {len(item)} characters; a document may have at most {MAX_INPUT_CHARS:,}"
        )
    return item


class RerankRequest(WireRequest):
    model: str
    query: str
    # validated into their texts; the schema documents what a client may send
    documents: Annotated[list[str], WithJsonSchema(_DOCUMENTS_SCHEMA, mode="validation")]
    top_n: int | None = Field(None, description="Return the best top_n results (default: all).")
    return_documents: bool = Field(True, description="Put each document's text into its result.")

    @field_validator("query", mode="after")
    @classmethod
    def _query(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        if len(value) > MAX_INPUT_CHARS:
            raise ValueError(f"has {len(value)} characters; the query may have at most {MAX_INPUT_CHARS:,}")
        return value

    @field_validator("documents", mode="before")
    @classmethod
    def _documents(cls, value: Any) -> Any:
        """Strings or {text} objects, as text; one clear message per mistake."""
        if not isinstance(value, list):
            raise ValueError(f"must be {_FORMS}")
        if not value:
            raise ValueError("must not be an empty array")
        texts = []
        total = 0
        for index, item in enumerate(value):
            text = _document_text(index, item)
            total += len(text)
            if total > MAX_REQUEST_CHARS:
                raise ValueError(f"the documents have more than {MAX_REQUEST_CHARS:,} characters in all")
            texts.append(text)
        return texts

    @field_validator("top_n", mode="after")
    @classmethod
    def _top_n(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"must be at least 1 (got {value})")
        return value

    def to_job(self, config: Any) -> RerankJob:
        limit = getattr(config, "max_rerank_documents", None)
        if limit is not None and len(self.documents) > limit:
            raise InvalidRequest(
                f"documents has {len(self.documents)} items; this model takes at most {limit} per request "
                "(max_rerank_documents)",
                param="documents",
                code="invalid_value",
            )
        return RerankJob(query=self.query, documents=tuple(self.documents))


def rerank_response(body: RerankRequest, result: RerankResult) -> dict[str, Any]:
    """Results by score, highest first (a stable sort: equal scores keep the documents' order)."""
    order = sorted(range(len(result.scores)), key=lambda index: -result.scores[index])
    if body.top_n is not None:
        order = order[: body.top_n]
    results = []
    for index in order:
        item: dict[str, Any] = {"index": index, "relevance_score": float(result.scores[index])}
        if body.return_documents:
            item["document"] = {"text": body.documents[index]}
        results.append(item)
    return {
        "id": response_id("rerank"),
        "model": body.model,
        "results": results,
        "usage": {"total_tokens": int(result.total_tokens)},
    }
