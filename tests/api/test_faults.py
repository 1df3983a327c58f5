"""Fault tests: clients that vanish at every stage, models that cannot load, engines that always raise,
clients that send too slowly. After each, ``GET /`` must show no busy instance and no waiter left."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from lllmsd.api.keys import RUNTIME
from lllmsd.app import create_app
from lllmsd.config import DaemonConfig
from lllmsd.core.clock import ManualClock
from lllmsd.core.jobs import ChatJob, CompletionJob, EmbeddingJob, EmbeddingResult, GenerationEvent
from lllmsd.core.runtime import Runtime
from lllmsd.engines.fake import FakeEngine
from lllmsd.errors import InvalidRequest
from lllmsd.server import protocol_options
from tests.api.probe import GATE_LIMIT, Probe, eventually
from tests.conftest import AppFactory, fake_model, make_config

ROUNDS = 100


def runtime_of(client: TestClient) -> Runtime:
    return client.server.app[RUNTIME]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def chat(client: TestClient, text: str, model: str = "chat", **extra: Any) -> tuple[int, dict[str, Any]]:
    response = await client.post("/v1/chat/completions", json={"model": model, "messages": user(text), **extra})
    if response.content_type == "text/event-stream":
        return response.status, {"stream": await response.text()}
    return response.status, await response.json()


def states(client: TestClient, model: str = "chat") -> list[str]:
    return [i.state.value for i in runtime_of(client).pools[model].instances]


async def assert_quiet(client: TestClient) -> dict[str, Any]:
    """What GET / says after a fault: nothing busy, nobody waiting, no engine slot held."""
    status = await (await client.get("/")).json()
    for model_id, model in status["models"].items():
        assert model["waiting"] == 0, model_id
        assert all(i["state"] in ("idle", "loading") for i in model["instances"]), (model_id, model["instances"])
    assert status["concurrency"]["in_use"] == 0
    return status


# ------------------------------------------------------------------------------------ disconnections


async def test_100_clients_leaving_the_queue_leave_no_waiter(start_app: AppFactory) -> None:
    probe = Probe(gated=True)
    config = make_config({"chat": fake_model(max_instances=1, max_waiting=4)})
    client = await start_app(config, engines={"fake": probe.engine_class()})
    pool = runtime_of(client).pools["chat"]
    running = asyncio.ensure_future(chat(client, "running"))
    await eventually(lambda: probe.active == 1)
    for n in range(ROUNDS):
        leaving = asyncio.ensure_future(chat(client, f"leaving {n}"))
        await eventually(lambda: pool.waiting == 1)
        leaving.cancel()  # the client closes its connection while queued
        await eventually(lambda: pool.waiting == 0)
    probe.gate.set()
    assert (await running)[0] == 200
    await eventually(lambda: states(client) == ["idle"])
    await assert_quiet(client)
    assert probe.seen == ["running"]  # none of the hundred that left ever reached the engine


class LoadGate:
    """Engine loads that block until the test lets them finish, so a client can leave mid-load."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.failing = threading.Event()
        self.lock = threading.Lock()
        self.loads = 0

    def engine_class(self, base: type[FakeEngine] = FakeEngine) -> type[FakeEngine]:
        gate = self

        class Gated(base):  # type: ignore[valid-type,misc]
            def __init__(self, config: Any, files: Any) -> None:
                with gate.lock:
                    gate.loads += 1
                if not gate.open.wait(GATE_LIMIT):
                    raise TimeoutError("load gate never opened")
                if gate.failing.is_set():
                    raise OSError("cannot map the weights: file truncated")
                super().__init__(config, files)

        return Gated


async def test_100_clients_leaving_while_their_instance_loads_leave_nothing_behind(start_app: AppFactory) -> None:
    gate = LoadGate()
    config = make_config({"chat": fake_model(max_instances=1, ttl=0)})
    client = await start_app(config, engines={"fake": gate.engine_class()})
    runtime = runtime_of(client)
    pool = runtime.pools["chat"]
    for n in range(ROUNDS):
        leaving = asyncio.ensure_future(chat(client, f"leaving {n}"))
        await eventually(lambda: states(client) == ["loading"] and pool.waiting == 1)
        leaving.cancel()  # gone while the instance it caused is still loading
        await eventually(lambda: pool.waiting == 0)
        gate.open.set()  # the load completes for nobody
        await eventually(lambda: states(client) == ["idle"])
        gate.open.clear()
        runtime.reap()  # ttl 0: the unused instance goes
        await eventually(lambda: states(client) == [])
    assert gate.loads == ROUNDS
    gate.open.set()
    assert (await chat(client, "still served"))[1]["choices"][0]["message"]["content"] == "still served"
    await assert_quiet(client)


@pytest.mark.parametrize("stream", [True, False])
async def test_100_clients_leaving_mid_generation_free_the_instance_each_time(
    start_app: AppFactory, stream: bool
) -> None:
    probe = Probe()
    config = make_config({"chat": fake_model(max_instances=1, token_delay=0.002)})
    client = await start_app(config, engines={"fake": probe.engine_class()})
    long_text = " ".join(f"w{i}" for i in range(2000))  # fits the context; the answer would take 256 tokens
    for _ in range(ROUNDS):
        if stream:
            response = await client.post(
                "/v1/chat/completions", json={"model": "chat", "messages": user(long_text), "stream": True}
            )
            assert response.status == 200
            assert (await response.content.readline()).startswith(b"data: {")
            response.close()  # gone mid-stream
        else:
            leaving = asyncio.ensure_future(chat(client, long_text))
            await eventually(lambda: probe.active == 1)
            leaving.cancel()  # gone while the answer is being generated
        await eventually(lambda: probe.active == 0 and states(client) == ["idle"])
    assert probe.created == 1  # the same instance served all hundred: none was lost or replaced
    assert probe.events_after_cancel <= ROUNDS  # at most one token after each cancel
    status = await assert_quiet(client)
    assert status["models"]["chat"]["instances"][0]["context_tokens"] < 2002 + 256  # none ran to the end
    assert (await chat(client, "next one"))[0] == 200


# ---------------------------------------------------------------------------------- failing models


async def test_a_model_that_fails_to_load_answers_503_to_every_waiter_and_recovers_when_fixed(
    start_app: AppFactory,
) -> None:
    gate = LoadGate()
    gate.failing.set()
    clock = ManualClock()
    config = make_config({"chat": fake_model(max_instances=1, max_waiting=16)})
    client = await start_app(config, engines={"fake": gate.engine_class()}, clock=clock)
    waiters = [asyncio.ensure_future(chat(client, f"waiter {n}")) for n in range(8)]
    await eventually(lambda: runtime_of(client).pools["chat"].waiting == 8)
    gate.open.set()
    results = await asyncio.gather(*waiters)
    assert [code for code, _ in results] == [503] * 8
    for _, body in results:
        assert body["error"]["code"] == "model_unavailable"
        assert "cannot map the weights" in body["error"]["message"]
    status = await assert_quiet(client)
    assert status["models"]["chat"]["state"] == "error"
    assert "file truncated" in status["models"]["chat"]["last_error"]
    assert (await client.get("/health")).status == 200
    gate.failing.clear()  # the weights are fixed; no restart
    clock.advance(2)  # the back-off after one failed load
    code, body = await chat(client, "after the fix")
    assert code == 200
    assert body["choices"][0]["message"]["content"] == "after the fix"
    status = await assert_quiet(client)
    assert (status["models"]["chat"]["state"], status["models"]["chat"]["last_error"]) == ("ready", None)


async def test_after_a_failed_load_requests_get_503_at_once_until_the_back_off_ends(start_app: AppFactory) -> None:
    """Every request must not start a load that fails again: during the back-off (2 s, then 4, 8, ...) a
    request gets the last load error and a Retry-After at once, and no load starts."""
    gate = LoadGate()
    gate.failing.set()
    gate.open.set()
    clock = ManualClock()
    client = await start_app(make_config({"chat": fake_model()}), engines={"fake": gate.engine_class()}, clock=clock)
    code, body = await chat(client, "first")
    assert (code, body["error"]["code"], gate.loads) == (503, "model_unavailable", 1)
    for expected_wait, _ in ((2, "first back-off"), (4, "second back-off")):
        for _ in range(5):
            response = await client.post("/v1/chat/completions", json={"model": "chat", "messages": user("again")})
            body = await response.json()
            assert response.status == 503
            assert body["error"]["code"] == "model_unavailable"
            assert "file truncated" in body["error"]["message"]
            assert 1 <= int(response.headers["Retry-After"]) <= expected_wait
        loads = gate.loads
        clock.advance(expected_wait)  # the back-off is over: the next request tries a load again
        code, _ = await chat(client, "retry")
        assert code == 503
        assert gate.loads == loads + 1
    gate.failing.clear()
    clock.advance(8)
    assert (await chat(client, "fixed"))[0] == 200


class BadChatFormat(FakeEngine):
    """A model whose own config is wrong in a way that shows only once the weights are read."""

    def __init__(self, config: Any, files: Any) -> None:
        raise InvalidRequest(
            "chat_format 'chat_template.tool_use': the model has no such template", param="chat_format"
        )


async def test_a_config_fault_that_shows_at_load_is_the_servers_503_not_the_clients_400(
    start_app: AppFactory,
) -> None:
    client = await start_app(make_config({"chat": fake_model()}), engines={"fake": BadChatFormat})
    code, body = await chat(client, "hello")
    assert code == 503
    assert body["error"]["type"] == "server_error"
    assert body["error"]["code"] == "model_unavailable"
    assert "'chat'" in body["error"]["message"]
    assert "no such template" in body["error"]["message"]


class AlwaysFailing(FakeEngine):
    """Raises on every call of a model configured with ``fail_after_tokens: 0``; others work."""

    def _broken(self) -> bool:
        return self.config.fail_after_tokens == 0

    def chat(self, job: ChatJob, cancel: threading.Event) -> Iterator[GenerationEvent]:
        if self._broken():
            raise MemoryError("engine out of memory")
        return super().chat(job, cancel)

    def complete(self, job: CompletionJob, cancel: threading.Event) -> Iterator[GenerationEvent]:
        if self._broken():
            raise RuntimeError("engine state corrupted")
        return super().complete(job, cancel)

    def embed(self, job: EmbeddingJob) -> EmbeddingResult:
        if self._broken():
            raise ValueError("engine returned NaN")
        return super().embed(job)


async def test_an_engine_that_raises_on_every_call_never_takes_the_daemon_down(start_app: AppFactory) -> None:
    config = make_config(
        {
            "broken": fake_model(max_instances=2, fail_after_tokens=0),
            "broken-emb": {"task": "embedding", "engine": "fake", "fail_after_tokens": 0},
            "chat": fake_model(max_instances=2),
        },
        concurrency=4,
    )
    client = await start_app(config, engines={"fake": AlwaysFailing})

    async def broken_call(n: int) -> tuple[int, dict[str, Any]]:
        kind = n % 4
        if kind == 0:
            return await chat(client, f"b{n}", model="broken")
        if kind == 1:
            return await chat(client, f"b{n}", model="broken", stream=True)
        path, body = (
            ("/v1/completions", {"model": "broken", "prompt": f"b{n}"})
            if kind == 2
            else ("/v1/embeddings", {"model": "broken-emb", "input": f"b{n}"})
        )
        response = await client.post(path, json=body)
        return response.status, await response.json()

    broken = [asyncio.ensure_future(broken_call(n)) for n in range(60)]
    good = [asyncio.ensure_future(chat(client, f"good {n}")) for n in range(30)]
    for code, body in await asyncio.gather(*broken):
        assert code == 500
        assert body["error"]["code"] == "engine_error"
        assert set(body["error"]) == {"message", "type", "param", "code"}
    for n, (code, body) in enumerate(await asyncio.gather(*good)):
        assert code == 200
        assert body["choices"][0]["message"]["content"] == f"good {n}"
    assert (await client.get("/health")).status == 200
    await runtime_of(client).pools["broken"].wait_idle()
    status = await assert_quiet(client)
    assert len(status["models"]["broken"]["instances"]) <= 2
    assert status["models"]["broken"]["last_error"]


# -------------------------------------------------------------------------------------- slow clients


async def start_with_protocol(aiohttp_client: Any, config: DaemonConfig) -> TestClient:
    """A test server with the connection settings `lllmsd serve` uses (server.protocol_options)."""
    server = TestServer(create_app(config, reap_interval=None))
    await server.start_server(**protocol_options(config))
    return await aiohttp_client(server)


async def slow_headers(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    for byte in b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty":
        writer.write(bytes([byte]))
        await writer.drain()
    return reader, writer  # ...and the rest of the headers never comes


async def stalled_body(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"model": "chat", '
    )
    await writer.drain()
    return reader, writer  # 982 bytes of body never come


async def test_slow_loris_clients_do_not_block_others_and_are_cut(aiohttp_client: Any) -> None:
    config = make_config(client_timeout=0.5)
    client = await start_with_protocol(aiohttp_client, config)
    host, port = client.server.host, client.server.port
    assert port is not None
    headers = [await slow_headers(host, port) for _ in range(30)]
    bodies = [await stalled_body(host, port) for _ in range(30)]
    for n in range(20):  # everyone else is served meanwhile
        code, body = await chat(client, f"normal {n}")
        assert (code, body["choices"][0]["message"]["content"]) == (200, f"normal {n}")
    # each stalled connection is closed by the server (a stalled body first gets a 408 naming the limit)
    for reader, writer in headers:
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    for reader, writer in bodies:
        answer = await asyncio.wait_for(reader.read(), 10)
        assert answer.startswith(b"HTTP/1.1 408")
        assert b"client_timeout" in answer
        writer.close()
    await assert_quiet(client)


def test_the_daemon_cuts_idle_and_stalled_connections_after_client_timeout() -> None:
    config = make_config(client_timeout=42)
    assert protocol_options(config) == {"keepalive_timeout": 42, "lingering_time": 10}
    assert make_config().client_timeout == 60  # not aiohttp's default of an hour


async def test_stalled_body_handler_is_a_normal_handler(start_app: AppFactory) -> None:
    """The 408 path is the ordinary error path: the envelope, and the request id header."""
    client = await start_app(make_config(client_timeout=0.2))
    response = await client.post(
        "/v1/chat/completions", data=_never_ending_body(), headers={"Content-Type": "application/json"}
    )
    assert response.status == 408
    body = await response.json()
    assert body["error"]["code"] == "request_timeout"
    assert "client_timeout" in body["error"]["message"]
    assert response.headers["X-Request-Id"]


async def _never_ending_body() -> Any:
    yield b'{"model": "chat", '
    await asyncio.Event().wait()  # the rest never comes (cancelled when the connection closes)
