"""Fixtures shared by every tier: configs and whole HTTP apps on the FakeEngine."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient

from lllmsd.app import create_app
from lllmsd.config import DaemonConfig, parse_config
from lllmsd.core.clock import Clock


def fake_model(**options: Any) -> dict[str, Any]:
    """A FakeEngine text model, as it would appear in YAML."""
    return {"task": "text-completion", "engine": "fake", **options}


def make_config(models: dict[str, dict[str, Any]] | None = None, **daemon: Any) -> DaemonConfig:
    return parse_config({"models": models if models is not None else {"chat": fake_model()}, **daemon})


AppFactory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def start_app(aiohttp_client: Any) -> AppFactory:
    """Start a whole daemon on a test server: ``await start_app(config, engines=..., clock=...)``.

    The reaper runs only when asked (``reap_interval``); tests that test time drive it themselves.
    """

    async def start(
        config: DaemonConfig | None = None,
        *,
        engines: dict[str, type] | None = None,
        clock: Clock | None = None,
        reap_interval: float | None = None,
    ) -> TestClient:
        app = create_app(config or make_config(), engines=engines, clock=clock, reap_interval=reap_interval)
        return await aiohttp_client(app)

    return start


@pytest.fixture
async def hub(aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    """A local server that answers like the Hugging Face Hub (tests/hubserver.py), set as the endpoint."""
    from tests.hubserver import start_hub

    hub, endpoint = await start_hub(aiohttp_server, monkeypatch)
    hub.endpoint = endpoint
    yield hub
    hub.release_all()


@pytest.fixture
async def client(start_app: AppFactory) -> TestClient:
    """A daemon with one fake chat model called "chat"."""
    return await start_app()


async def sse_data(response: Any) -> list[Any]:
    """The JSON of every ``data:`` event of an SSE response, in order, without the final [DONE]."""
    events = []
    async for line in response.content:
        text = line.decode().strip()
        if text.startswith("data: ") and text != "data: [DONE]":
            events.append(json.loads(text[6:]))
    return events


def sdk(client: TestClient, prefix: str = "/v1", **options: Any) -> openai.AsyncOpenAI:
    """The official OpenAI client pointed at a test daemon."""
    return openai.AsyncOpenAI(
        base_url=str(client.make_url(prefix)), api_key=options.pop("api_key", "unused"), max_retries=0, **options
    )


@pytest.fixture
async def openai_client(client: TestClient) -> AsyncIterator[openai.AsyncOpenAI]:
    async with sdk(client) as api:
        yield api
