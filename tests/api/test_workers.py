"""Engines in worker processes, on the FakeEngine: a worker that dies or hangs costs its instance only,
time budgets end requests, shutdown never waits past its grace, and GET / shows each worker's memory.
(tests/engines/test_worker_crashes.py does the same with real engines.)"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from lllmsd.api.keys import RUNTIME
from lllmsd.app import create_app
from tests.api.probe import eventually
from tests.api.stuck_engine import StuckEngine
from tests.conftest import AppFactory, fake_model, make_config, sse_data


def worker_model(**options: Any) -> dict[str, Any]:
    return fake_model(isolation="process", **options)


async def chat(client: TestClient, model: str, text: str, **extra: Any) -> tuple[int, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    response = await client.post("/v1/chat/completions", json=body)
    return response.status, await response.json()


async def workers(client: TestClient, model: str) -> list[dict[str, Any]]:
    status = await (await client.get("/")).json()
    return [i["worker"] for i in status["models"][model]["instances"] if i["worker"]]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT])
async def test_a_worker_killed_mid_stream_costs_its_request_only(start_app: AppFactory, sig: signal.Signals) -> None:
    words = " ".join(f"w{i}" for i in range(60))
    config = make_config({"a": worker_model(token_delay=0.02), "b": worker_model(token_delay=0.02)})
    client = await start_app(config)
    assert (await chat(client, "a", "warm up"))[0] == 200
    assert (await chat(client, "b", "warm up"))[0] == 200
    (victim,) = await workers(client, "a")

    other = asyncio.ensure_future(
        client.post(
            "/v1/chat/completions",
            json={"model": "b", "stream": True, "messages": [{"role": "user", "content": words}]},
        )
    )
    response = await client.post(
        "/v1/chat/completions", json={"model": "a", "stream": True, "messages": [{"role": "user", "content": words}]}
    )
    assert response.status == 200
    first = await response.content.readline()
    assert first.startswith(b"data: ")
    os.kill(victim["pid"], sig)
    events = await sse_data(response)
    assert events[-1]["error"]["code"] == "worker_died"
    assert sig.name in events[-1]["error"]["message"]

    other_events = await sse_data(await other)  # the other model streamed on, undisturbed
    assert other_events[-1]["choices"][0]["finish_reason"] == "stop"
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in other_events if e["choices"]) == words

    status, body = await chat(client, "a", "after the crash")
    assert status == 200
    assert body["choices"][0]["message"]["content"] == "after the crash"
    (replacement,) = await workers(client, "a")
    assert replacement["pid"] != victim["pid"]
    assert (await client.get("/health")).status == 200


async def test_a_worker_that_ignores_a_cancel_is_killed_after_the_grace(start_app: AppFactory) -> None:
    config = make_config({"chat": worker_model(cancel_grace=0.5)})
    client = await start_app(config, engines={"fake": StuckEngine})
    runtime = client.server.app[RUNTIME]
    response = await client.post(
        "/v1/chat/completions", json={"model": "chat", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    )
    assert (await response.content.readline()).startswith(b"data: ")
    (victim,) = await workers(client, "chat")
    response.close()  # the client leaves; the worker never looks at its cancel
    await eventually(lambda: not _alive(victim["pid"]))
    await eventually(lambda: all(i.state.value != "busy" for i in runtime.pools["chat"].instances))
    assert runtime.limiter.in_use == 0


async def test_an_embedding_past_its_time_budget_is_503_and_the_worker_is_replaced(start_app: AppFactory) -> None:
    model = {
        "task": "embedding",
        "engine": "fake",
        "isolation": "process",
        "max_request_seconds": 0.5,
        "cancel_grace": 0.5,
    }
    client = await start_app(make_config({"emb": model}), engines={"fake": StuckEngine})
    response = await client.post("/v1/embeddings", json={"model": "emb", "input": "x"})
    body = await response.json()
    assert response.status == 503
    assert body["error"]["code"] == "time_budget_exceeded"
    assert "max_request_seconds" in body["error"]["message"]


async def test_generation_past_its_time_budget_ends_with_length(start_app: AppFactory) -> None:
    words = " ".join(f"w{i}" for i in range(200))
    for isolation in ("process", "thread"):
        model = fake_model(isolation=isolation, token_delay=0.01, max_request_seconds=0.3)
        client = await start_app(make_config({"chat": model}))
        status, body = await chat(client, "chat", words)
        assert status == 200, body
        choice = body["choices"][0]
        assert choice["finish_reason"] == "length"
        assert 0 < body["usage"]["completion_tokens"] < 200


async def test_shutdown_never_waits_past_its_grace_for_a_stuck_worker(aiohttp_client: Any) -> None:
    config = make_config({"chat": worker_model(cancel_grace=30)}, shutdown_grace=1)
    app = create_app(config, engines={"fake": StuckEngine}, reap_interval=None)
    client = await aiohttp_client(app)
    request = asyncio.ensure_future(
        client.post("/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "x"}]})
    )
    runtime = app[RUNTIME]
    await eventually(lambda: any(i.state.value == "busy" for i in runtime.pools["chat"].instances))
    (victim,) = await workers(client, "chat")
    started = time.monotonic()
    await runtime.stop()
    took = time.monotonic() - started
    print(f"shutdown with a stuck worker took {took:.2f}s (shutdown_grace 1s)")
    assert not _alive(victim["pid"])
    response = await request
    assert response.status >= 500
    await client.close()


async def test_status_shows_each_workers_memory(start_app: AppFactory) -> None:
    client = await start_app(make_config({"chat": worker_model(min_instances=2, max_instances=2)}))
    await eventually(lambda: len(client.server.app[RUNTIME].pools["chat"].instances) == 2)
    await eventually(lambda: all(i.state.value == "idle" for i in client.server.app[RUNTIME].pools["chat"].instances))
    found = await workers(client, "chat")
    assert len(found) == 2
    assert len({w["pid"] for w in found}) == 2
    for worker in found:
        assert worker["rss_bytes"] > 10 * 2**20  # a Python interpreter with the engine loaded
        assert 0 < worker["pss_bytes"] <= worker["rss_bytes"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too: the daemon reaps its workers, so one that lingers as a zombie has not been waited
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except OSError:
        return False
