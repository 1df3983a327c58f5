"""Downloads seen through the whole daemon: requests wait for a model's weights (and do not time out while
they arrive), fail with 503 when the download fails and retry on the next request, other models keep
answering, GET / shows progress, and ``prepare`` decides when a download starts."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from lllmsd.api.keys import RUNTIME
from lllmsd.app import create_app
from lllmsd.core.clock import ManualClock
from lllmsd.core.store import ModelStore
from tests.api.probe import eventually
from tests.conftest import fake_model, make_config
from tests.hubserver import FakeHub, HubFile, files_under, payload

SIZE = 16 * 1024


async def daemon(
    aiohttp_client: Any, hub: FakeHub, cache: Path, models: dict[str, Any], clock: ManualClock | None = None
) -> TestClient:
    store = ModelStore(cache, endpoint=hub.endpoint)  # type: ignore[attr-defined]
    app = create_app(make_config(models), store=store, clock=clock, reap_interval=None)
    return await aiohttp_client(app)


async def chat(client: TestClient, model: str, text: str = "hello there") -> tuple[int, Any]:
    response = await client.post(
        "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": text}]}
    )
    return response.status, await response.json()


def weights(hub: FakeHub, **behaviour: Any) -> HubFile:
    hub_file = hub.add("org/m", "m.gguf", payload(SIZE))
    for name, value in behaviour.items():
        setattr(hub_file, name, value)
    return hub_file


async def test_requests_wait_for_a_slow_download_and_all_succeed(
    aiohttp_client: Any, hub: FakeHub, tmp_path: Path
) -> None:
    hub_file = weights(hub, hold_after=4096)
    clock = ManualClock()
    client = await daemon(
        aiohttp_client,
        hub,
        tmp_path,
        {
            "chat": fake_model(repo="org/m", file="m.gguf", sha256=hub_file.sha256, prepare="on-demand"),
            "other": fake_model(),
        },
        clock,
    )
    assert not hub.requests  # on-demand: nothing before the first request

    waiting = [asyncio.ensure_future(chat(client, "chat", f"request {n}")) for n in range(3)]
    await hub_file.started.wait()
    runtime = client.server.app[RUNTIME]
    await eventually(lambda: runtime.pools["chat"].waiting == 3)

    # GET / shows the download while it runs
    await eventually(lambda: runtime.store.status()[0]["bytes_done"] >= 4096)
    status = await (await client.get("/")).json()
    [download] = status["downloads"]
    assert download["model"] == "chat"
    assert download["file"] == "m.gguf"
    assert download["state"] == "downloading"
    assert download["bytes_total"] == SIZE
    assert 4096 <= download["bytes_done"] < SIZE
    assert set(download) >= {"speed_bytes_per_second", "eta_seconds"}

    # another model keeps answering meanwhile
    code, body = await chat(client, "other", "still here")
    assert (code, body["choices"][0]["message"]["content"]) == (200, "still here")

    # far past queue_timeout: waiting for bytes is not queueing
    clock.advance(10 * 300)
    runtime.reap()
    assert runtime.pools["chat"].waiting == 3
    assert not any(w.done() for w in waiting)

    hub_file.gate.set()
    results = await asyncio.gather(*waiting)
    assert [(code, body["choices"][0]["message"]["content"]) for code, body in results] == [
        (200, f"request {n}") for n in range(3)
    ]
    assert len(hub.gets("m.gguf")) == 1
    status = await (await client.get("/")).json()
    assert status["downloads"][0]["state"] == "done"


async def test_a_cut_off_download_fails_its_waiters_with_503_and_the_next_request_retries(
    aiohttp_client: Any, hub: FakeHub, tmp_path: Path
) -> None:
    hub_file = weights(hub, cut_after=3000, cuts=1000, hold_after=2000)
    client = await daemon(
        aiohttp_client, hub, tmp_path, {"chat": fake_model(repo="org/m", file="m.gguf", prepare="on-demand")}
    )
    waiting = [asyncio.ensure_future(chat(client, "chat")) for _ in range(2)]
    await eventually(lambda: client.server.app[RUNTIME].pools["chat"].waiting == 2)
    hub_file.gate.set()
    for code, body in await asyncio.gather(*waiting):
        assert code == 503
        assert body["error"]["code"] == "model_unavailable"
        assert "org/m/m.gguf@main" in body["error"]["message"]
        assert "peer closed connection" in body["error"]["message"]
    status = await (await client.get("/")).json()
    assert status["downloads"][0]["state"] == "failed"
    assert status["models"]["chat"]["last_error"] is not None

    hub_file.heal()
    code, body = await chat(client, "chat", "second try")
    assert (code, body["choices"][0]["message"]["content"]) == (200, "second try")


async def test_a_corrupted_download_answers_503_naming_both_hashes(
    aiohttp_client: Any, hub: FakeHub, tmp_path: Path
) -> None:
    hub_file = weights(hub, corrupt=True)
    url = f"{hub.endpoint}/org/m/resolve/main/m.gguf"  # type: ignore[attr-defined]
    client = await daemon(
        aiohttp_client, hub, tmp_path, {"chat": fake_model(url=url, sha256=hub_file.sha256, prepare="on-demand")}
    )
    code, body = await chat(client, "chat")
    assert code == 503
    assert body["error"]["code"] == "model_unavailable"
    assert f"expected sha256 {hub_file.sha256}, got " in body["error"]["message"]
    assert "the file was deleted" in body["error"]["message"]
    assert not files_under(tmp_path, "m.gguf")

    hub_file.heal()
    assert (await chat(client, "chat"))[0] == 200


async def test_prepare_blocking_downloads_before_the_server_listens(
    aiohttp_client: Any, hub: FakeHub, tmp_path: Path
) -> None:
    weights(hub)
    client = await daemon(
        aiohttp_client, hub, tmp_path, {"chat": fake_model(repo="org/m", file="m.gguf", prepare="blocking")}
    )
    # the client exists only once the app started: the download was already complete by then
    assert client.server.app[RUNTIME].store.status()[0]["state"] == "done"
    assert len(hub.gets("m.gguf")) == 1
    assert (await chat(client, "chat"))[0] == 200
    assert len(hub.gets("m.gguf")) == 1


async def test_prepare_async_downloads_in_the_background_from_start_up(
    aiohttp_client: Any, hub: FakeHub, tmp_path: Path
) -> None:
    hub_file = weights(hub, hold_after=1024)
    client = await daemon(aiohttp_client, hub, tmp_path, {"chat": fake_model(repo="org/m", file="m.gguf")})
    await hub_file.started.wait()  # no request was made: the default prepare (async) started it
    assert (await client.get("/health")).status == 200  # and the server listens meanwhile
    hub_file.gate.set()
    store = client.server.app[RUNTIME].store
    await eventually(lambda: store.status()[0]["state"] == "done")
    assert (await chat(client, "chat"))[0] == 200
    assert len(hub.gets("m.gguf")) == 1
