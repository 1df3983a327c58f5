"""The client libraries people use, driven against a whole daemon as their users write them.

Each test starts the daemon on a local port (aiohttp's test server) and points LangChain, LlamaIndex or
LiteLLM at it with nothing but a base URL and a key, as docs/clients.md shows. The FakeEngine serves
where the answer does not matter (its answers echo the request: tests can assert them); SmolLM2 (llama-cpp)
serves where the grammar does (structured output on nested models, tool calls), with greedy sampling.
Synchronous methods (``invoke``, ``completion``) run on a thread while the daemon serves on the loop.

Offline: tiktoken would download OpenAI's cl100k_base table, which LangChain's OpenAIEmbeddings and
LlamaIndex use; ``TIKTOKEN_CACHE_DIR`` points it at the copy LiteLLM ships. LiteLLM fetches its model
price list at import unless ``LITELLM_LOCAL_MODEL_COST_MAP`` is set. Both are set here, before any of the
libraries is imported (docs/clients.md lists them for users).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient


def _litellm_tokenizers() -> str:
    spec = importlib.util.find_spec("litellm")
    assert spec is not None, "the test extra installs litellm"
    assert spec.submodule_search_locations
    return str(Path(next(iter(spec.submodule_search_locations))) / "litellm_core_utils" / "tokenizers")


os.environ.setdefault("TIKTOKEN_CACHE_DIR", _litellm_tokenizers())
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LANGCHAIN_TRACING_V2", "false")

from tests.conftest import AppFactory, fake_model, make_config  # noqa: E402
from tests.setup_models import model_path  # noqa: E402

KEY = "sk-local"  # any key: the daemon has none configured


def smollm2() -> dict[str, Any]:
    return {
        "task": "text-completion",
        "engine": "llama-cpp",
        "location": str(model_path("smollm2")),
        "context_size": 2048,
        "completion_defaults": {"temperature": 0},
        "device": {"threads": 1, "batch_threads": 1},  # ggml's spin-waiting crawls on busy shared cores
    }


def fake_models() -> dict[str, dict[str, Any]]:
    return {
        "chat": fake_model(),
        "emb": {"task": "embedding", "engine": "fake", "dimensions": 16},
        "stt": {"task": "speech-to-text", "engine": "fake"},
    }


def base_url(client: TestClient) -> str:
    return str(client.make_url("/v1"))


@pytest.fixture
async def fake_daemon(start_app: AppFactory) -> TestClient:
    """A daemon with fake chat ("chat"), embedding ("emb") and speech-to-text ("stt") models."""
    return await start_app(make_config(fake_models()))


@pytest.fixture
async def smol_daemon(start_app: AppFactory) -> TestClient:
    """A daemon with SmolLM2 as "smol" (its weights load on the first request, in a worker process)."""
    return await start_app(make_config({"smol": smollm2()}))


@pytest.fixture
async def minilm_daemon(start_app: AppFactory) -> TestClient:
    """A daemon with all-MiniLM-L6-v2 as "minilm" (sentence-transformers, torch)."""
    model = {"task": "embedding", "engine": "sentence-transformers", "location": str(model_path("minilm"))}
    return await start_app(make_config({"minilm": model}))
