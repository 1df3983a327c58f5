"""Token ids in a request, read as the model's config says (``token_ids``): OpenAI's cl100k_base ids by
default, decoded to text here (core/openai_tokens.py), or the model's own ids, left for the engine."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from lllmsd.core.openai_tokens import EncodingUnavailable, TokenOutOfRange, cl100k_decoder
from lllmsd.errors import InvalidRequest


def reads_openai_ids(config: Any) -> bool:
    return getattr(config, "token_ids", "openai") == "openai"


async def load_decoder() -> None:
    """Read the encoding's table on a thread (about half a second, once per process) before a request that
    needs it is admitted, so that admission's decoding does not hold up the event loop."""
    # without it, the request is refused when it is admitted, with the message saying what to install
    with contextlib.suppress(EncodingUnavailable):
        await asyncio.to_thread(cl100k_decoder)


def decode_openai_ids(tokens: tuple[int, ...], param: str) -> str:
    """The text whose cl100k_base ids are ``tokens``, or a 400 naming ``param`` that says what to change."""
    try:
        return cl100k_decoder().decode(tokens)
    except EncodingUnavailable as exc:
        raise InvalidRequest(
            f"{param}: token ids are read as OpenAI's cl100k_base ids, but {exc}. Or send text instead "
            "(LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False)), or set `token_ids: model` for "
            "this model to read ids in its own vocabulary",
            param=param,
            code="invalid_value",
        ) from None
    except TokenOutOfRange as exc:
        raise InvalidRequest(
            f"{param}[{exc.position}]: {exc} (this model reads token ids as OpenAI's; `token_ids: model` in its "
            "config reads them in its own vocabulary)",
            param=f"{param}[{exc.position}]",
            code="invalid_value",
        ) from None
