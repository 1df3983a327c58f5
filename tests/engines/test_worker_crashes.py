"""Real engines in worker processes: a worker that dies mid-stream (SIGKILL as from the OOM killer,
SIGSEGV as from a crash in llama.cpp) costs its own request only. Its client gets an error event naming
the crash, the next request is served by a new worker, another model streams on undisturbed, and the
daemon keeps serving embeddings."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from lllmsd.app import create_app
from lllmsd.config import parse_config
from tests.conftest import sse_data
from tests.engines.conftest import EMBEDDING_MODELS, TEXT_MODELS

pytestmark = pytest.mark.engines

STORY = "Write a long story about a dragon who lives in a castle by the sea."


@pytest.fixture
async def daemon(aiohttp_client: Any) -> TestClient:
    models = {
        "chat": TEXT_MODELS["llama-cpp"](),
        "other": TEXT_MODELS["llama-cpp"](),
        "emb": EMBEDDING_MODELS["st-onnx"](),
    }
    config = parse_config({"models": models, "concurrency": 3})
    return await aiohttp_client(create_app(config, reap_interval=None))


async def stream(client: TestClient, model: str, max_tokens: int) -> Any:
    body = {
        "model": model,
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0,
        "messages": [{"role": "user", "content": STORY}],
    }
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status == 200
    return response


async def worker_pids(client: TestClient, model: str) -> list[int]:
    status = await (await client.get("/")).json()
    return [i["worker"]["pid"] for i in status["models"][model]["instances"] if i["worker"]]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
async def test_a_worker_killed_mid_stream_costs_its_request_only(daemon: TestClient, sig: signal.Signals) -> None:
    assert await (await stream(daemon, "chat", 2)).read()  # both models loaded, in their workers
    assert await (await stream(daemon, "other", 2)).read()
    (victim,) = await worker_pids(daemon, "chat")

    other = await stream(daemon, "other", 48)
    doomed = await stream(daemon, "chat", 200)
    for _ in range(3):  # a few tokens in
        assert (await doomed.content.readline()) is not None
    os.kill(victim, sig)
    events = await sse_data(doomed)
    assert events[-1]["error"]["code"] == "worker_died"
    assert sig.name in events[-1]["error"]["message"]

    other_events = await sse_data(other)
    assert other_events[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for e in other_events if e["choices"] and e["choices"][0]["delta"].get("content")) >= 40

    response = await daemon.post(
        "/v1/chat/completions", json={"model": "chat", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    )
    assert response.status == 200
    assert (await response.json())["usage"]["completion_tokens"] > 0
    assert (await worker_pids(daemon, "chat")) != [victim]
    response = await daemon.post("/v1/embeddings", json={"model": "emb", "input": "still serving"})
    assert response.status == 200


async def test_workers_of_one_gguf_share_its_weights(daemon: TestClient) -> None:
    """GGUF weights are mmapped: two workers of one file share those pages, so each one's proportional
    share (PSS) is well below what it has resident (RSS)."""
    for model in ("chat", "other"):
        assert await (await stream(daemon, model, 2)).read()
    status = await (await daemon.get("/")).json()
    workers = [i["worker"] for m in ("chat", "other") for i in status["models"][m]["instances"]]
    assert len(workers) == 2
    for worker in workers:
        assert worker["pss_bytes"] < worker["rss_bytes"]
    print("workers (rss, pss) MiB:", [(w["rss_bytes"] >> 20, w["pss_bytes"] >> 20) for w in workers])


async def test_a_worker_with_slots_killed_mid_stream_fails_each_of_its_requests_clearly(aiohttp_client: Any) -> None:
    """A crash costs every request on the instance's slots (docs/operations.md): each gets the error event
    naming it, none hangs, and the next request is served by a new worker."""
    config = parse_config({"models": {"chat": TEXT_MODELS["llama-cpp-slots"]()}, "concurrency": 4})
    client = await aiohttp_client(create_app(config, reap_interval=None))
    assert await (await stream(client, "chat", 2)).read()
    (victim,) = await worker_pids(client, "chat")
    doomed = [await stream(client, "chat", 200) for _ in range(2)]
    for response in doomed:
        for _ in range(3):  # a few tokens in, both on the one instance
            assert (await response.content.readline()) is not None
    status = await (await client.get("/")).json()
    assert [i["active_requests"] for i in status["models"]["chat"]["instances"]] == [2]
    os.kill(victim, signal.SIGKILL)
    for response in doomed:
        events = await sse_data(response)
        assert events[-1]["error"]["code"] == "worker_died"
    response = await client.post(
        "/v1/chat/completions", json={"model": "chat", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    )
    assert response.status == 200
    assert (await worker_pids(client, "chat")) != [victim]
