"""max_connections and the open-files limit (lllmsd/connections.py), on the real listening path.

Each test starts the daemon the way `lllmsd serve` does (server.make_runner and server.listen: the
connection cap in front of aiohttp's protocol) on 127.0.0.1, opens raw idle sockets to it, and checks that
health checks and chats still get through: at the cap the least recently active idle connection is closed
to make room, and only when every connection is busy is a new one answered 503 too_many_connections.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lllmsd import connections
from lllmsd.api.keys import RUNTIME
from lllmsd.app import create_app
from lllmsd.config import DaemonConfig
from lllmsd.connections import RESERVE, CappedTCPSite, connection_cap, raise_open_files_limit
from lllmsd.server import listen, make_runner
from tests.api.probe import Probe, eventually
from tests.conftest import fake_model, make_config

HOST = "127.0.0.1"
ISSUE_SCALE = 1100  # the idle connections of the issue
Socket = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture(autouse=True)
def open_files() -> int:
    """Raise this test process's soft open-files limit: it holds both ends of every connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * ISSUE_SCALE if hard == resource.RLIM_INFINITY else min(hard, 4 * ISSUE_SCALE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return max(soft, wanted)


@dataclass
class Daemon:
    runner: web.AppRunner
    site: CappedTCPSite
    url: str
    sockets: list[Socket] = field(default_factory=list)

    @property
    def cap(self) -> connections.ConnectionCap:
        return self.site.cap

    async def idle(self, count: int, first: bytes = b"") -> list[Socket]:
        """``count`` connections that send ``first`` (nothing, or part of a request's headers) and wait."""
        opened = []
        for _ in range(count):
            reader, writer = await asyncio.open_connection(HOST, self.port)
            if first:
                writer.write(first)
                await writer.drain()
            opened.append((reader, writer))
        self.sockets += opened
        return opened

    async def kept_alive(self, count: int) -> list[Socket]:
        """``count`` connections that completed one request and keep the connection open for the next."""
        opened = await self.idle(count, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        for reader, _ in opened:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200")
            length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:])
            await reader.readexactly(length)
        return opened

    @property
    def port(self) -> int:
        return int(self.runner.addresses[0][1])


def closed_by_server(sockets: list[Socket]) -> list[bool]:
    return [reader.at_eof() for reader, _ in sockets]


@pytest.fixture
async def start_daemon() -> AsyncIterator[Callable[..., Awaitable[Daemon]]]:
    started: list[Daemon] = []

    async def start(config: DaemonConfig, engines: dict[str, type] | None = None) -> Daemon:
        runner = make_runner(create_app(config, engines=engines, reap_interval=None), config)
        await runner.setup()
        site = await listen(runner, config, HOST, 0)
        daemon = Daemon(runner, site, "")
        daemon.url = f"http://{HOST}:{daemon.port}"
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        for _, writer in daemon.sockets:
            writer.close()
        await daemon.runner.cleanup()


async def get(url: str) -> tuple[int, dict[str, Any], aiohttp.typedefs.LooseHeaders]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json(), response.headers


async def chat(url: str, text: str) -> tuple[int, dict[str, Any]]:
    body = {"model": "chat", "messages": [{"role": "user", "content": text}]}
    async with aiohttp.ClientSession() as session, session.post(f"{url}/v1/chat/completions", json=body) as response:
        return response.status, await response.json()


async def assert_served(daemon: Daemon, text: str) -> None:
    status, body, _ = await get(f"{daemon.url}/health")
    assert status == 200, body
    status, body = await chat(daemon.url, text)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == text


# ------------------------------------------------------------------------------------- idle floods


async def test_the_issue_1100_idle_connections_do_not_stop_health_or_chat(start_daemon: Any, open_files: int) -> None:
    if open_files < 2 * ISSUE_SCALE + RESERVE:
        pytest.skip(f"the open-files hard limit ({open_files}) cannot hold both ends of {ISSUE_SCALE} connections")
    daemon = await start_daemon(make_config(max_connections=1000))
    idle = await daemon.idle(ISSUE_SCALE)
    # the 100 oldest were closed to make room for the 100 newest: the daemon never held more than 1000
    await eventually(lambda: sum(closed_by_server(idle)) == ISSUE_SCALE - 1000)
    assert closed_by_server(idle) == [True] * 100 + [False] * 1000
    for n in range(3):
        await assert_served(daemon, f"still served {n}")
    assert daemon.cap.peak == 1000
    assert daemon.cap.refused == 0
    assert daemon.cap.open <= 1000


async def test_60_idle_connections_over_a_cap_of_50_leave_room_for_health_and_chat(start_daemon: Any) -> None:
    daemon = await start_daemon(make_config(max_connections=50))
    idle = await daemon.idle(60)
    await eventually(lambda: sum(closed_by_server(idle)) == 10)
    assert closed_by_server(idle) == [True] * 10 + [False] * 50  # the oldest went first
    for n in range(20):
        await assert_served(daemon, f"served {n}")
    assert daemon.cap.peak == 50
    assert daemon.cap.refused == 0
    # each health check or chat that found no free slot took the place of an idle connection, oldest first
    await eventually(lambda: sum(closed_by_server(idle)) == daemon.cap.evicted)
    closed = closed_by_server(idle)
    assert closed == sorted(closed, reverse=True)


async def test_kept_alive_half_sent_and_silent_connections_all_count_and_make_room(start_daemon: Any) -> None:
    daemon = await start_daemon(make_config(max_connections=9))
    kept = await daemon.kept_alive(3)  # finished a request; waiting for the next one
    slow = await daemon.idle(3, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")  # slow-loris
    silent = await daemon.idle(3)
    await eventually(lambda: daemon.cap.open == 9)
    newcomers: list[Socket] = []
    for n in range(6):  # each new connection (a health check it keeps alive) displaces one idle connection
        newcomers += await daemon.kept_alive(1)
        await eventually(lambda n=n: sum(closed_by_server(kept + slow + silent)) == n + 1)
    # least recently active first: the kept-alive ones (their last request is the oldest), then the half-sent
    assert closed_by_server(kept + slow) == [True] * 6
    assert closed_by_server(silent + newcomers) == [False] * 9
    await assert_served(daemon, "still served")
    assert daemon.cap.peak == 9
    assert daemon.cap.refused == 0


# ------------------------------------------------------------------------------------ all busy: 503


async def test_when_every_connection_is_busy_a_new_one_gets_the_503_envelope_and_close(start_daemon: Any) -> None:
    probe = Probe(gated=True)
    daemon = await start_daemon(
        make_config({"chat": fake_model(max_instances=1)}, max_connections=3), engines={"fake": probe.engine_class()}
    )
    busy = [asyncio.ensure_future(chat(daemon.url, f"busy {n}")) for n in range(3)]
    pool = daemon.runner.app[RUNTIME].pools["chat"]
    await eventually(lambda: probe.active == 1 and pool.waiting == 2)  # one generating, two queued
    assert daemon.cap.open == 3
    server = daemon.runner.server
    assert server is not None
    requests_seen = server.requests_count  # requests aiohttp has handed to the app

    # a raw client: the whole answer, then the server closes the connection
    reader, writer = await asyncio.open_connection(HOST, daemon.port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 503 Service Unavailable"
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    assert headers["connection"] == "close"
    assert headers["content-type"].startswith("application/json")
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("server_error", None, "too_many_connections")
    assert "max_connections" in error["message"]

    # an HTTP client reads it as an ordinary 503 envelope
    status, body_json, response_headers = await get(f"{daemon.url}/health")
    assert status == 503
    assert body_json["error"]["code"] == "too_many_connections"
    assert response_headers["Connection"] == "close"
    status, body_json = await chat(daemon.url, "refused")
    assert status == 503
    assert body_json["error"]["code"] == "too_many_connections"

    assert server.requests_count == requests_seen  # none of the refused requests reached the app
    assert daemon.cap.refused == 3
    assert daemon.cap.evicted == 0
    assert daemon.cap.open == 3
    probe.gate.set()
    assert [code for code, _ in await asyncio.gather(*busy)] == [200, 200, 200]
    await assert_served(daemon, "room again")
    assert "refused" not in probe.seen
    await eventually(lambda: not daemon.cap.lingering)  # the refused connections are all closed


# ----------------------------------------------------------------------------------- open-files limit


def test_the_soft_open_files_limit_is_raised_to_the_hard_one(monkeypatch: pytest.MonkeyPatch) -> None:
    limits = {"now": (1024, 524288)}
    monkeypatch.setattr(resource, "getrlimit", lambda which: limits["now"])
    monkeypatch.setattr(resource, "setrlimit", lambda which, value: limits.update(now=value))
    assert raise_open_files_limit() == 524288
    assert limits["now"] == (524288, 524288)
    assert raise_open_files_limit() == 524288  # already there: nothing to do


def test_a_limit_that_cannot_be_raised_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(which: int, value: tuple[int, int]) -> None:
        raise ValueError("not allowed")

    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 4096))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    assert raise_open_files_limit() == 1024


def test_a_cap_the_limit_holds_is_kept_silently(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert connection_cap(1000, 65536) == 1000
        assert connection_cap(1000, 1000 + RESERVE) == 1000
    assert caplog.records == []


def test_a_cap_the_limit_cannot_hold_is_lowered_with_one_warning_naming_limitnofile(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        assert connection_cap(1000, 1024) == 1024 - RESERVE
    [record] = caplog.records
    message = record.getMessage()
    assert record.levelno == logging.WARNING
    assert "open-files limit (1024)" in message
    assert "max_connections (1000)" in message
    assert f"serving at most {1024 - RESERVE}" in message
    assert f"LimitNOFILE={1000 + RESERVE}" in message
    assert connection_cap(1000, 300) == 150  # a tiny limit still leaves half of it to connections
    assert connection_cap(100, 300) == 100  # never more than asked for


async def test_serve_applies_the_lowered_cap(start_daemon: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lllmsd.server.raise_open_files_limit", lambda: 2 * RESERVE)
    daemon = await start_daemon(make_config(max_connections=10_000))
    assert daemon.cap.limit == RESERVE
    assert (await get(f"{daemon.url}/health"))[0] == 200


def test_the_default_cap_is_1000() -> None:
    assert make_config().max_connections == 1000


def test_the_systemd_unit_gives_the_default_cap_its_open_files() -> None:
    unit = Path(__file__).resolve().parents[2] / "systemd" / "lllmsd.service"
    [line] = [line for line in unit.read_text().splitlines() if line.startswith("LimitNOFILE=")]
    assert int(line.split("=", 1)[1]) >= make_config().max_connections + RESERVE
