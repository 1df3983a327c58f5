"""The cap on open connections (``max_connections``) and the open-files limit behind it.

Every connection is a file descriptor. At systemd's default soft limit (1,024) a flood of idle sockets
used to exhaust them: ``accept()`` failed and even ``/health`` timed out until the sockets closed. So:

- at start-up the daemon raises its soft ``RLIMIT_NOFILE`` to the hard limit (``raise_open_files_limit``)
  and, if that still cannot hold ``max_connections`` plus ``RESERVE`` descriptors for everything else,
  warns once with the ``LimitNOFILE`` to set and serves that many fewer connections (``connection_cap``),
  so the cap is reached before the descriptors run out;
- every accepted connection passes through ``ConnectionCap`` before aiohttp sees it. Below the cap it is
  handed to aiohttp's protocol. At the cap, the *least recently active idle* connection is closed to
  make room, the way nginx reuses idle keep-alive connections when ``worker_connections`` run out
  ("worker_connections are not enough, reusing connections"). Idle means aiohttp is waiting for a
  request's headers on it: a kept-alive connection between requests, one that has sent nothing, or one
  still sending its headers (slow-loris). A connection with a request being read, handled or answered is
  never closed for room. Only when every connection is busy is the new one refused: an immediate
  HTTP/1.1 503 ``too_many_connections`` (the OpenAI error envelope, ``Connection: close``) written before
  reading anything, without the app ever seeing it.

So a flood of idle sockets cannot keep a health probe out: its new connection displaces the oldest idle
one. Closing an idle kept-alive connection is what aiohttp's ``keepalive_timeout`` (``client_timeout``)
does anyway, and HTTP clients retry a request on a pooled connection the server closed.

Concurrency: asyncio calls protocol methods on the event loop thread, and everything here runs there, in
synchronous methods: the counts change with no ``await`` between a decision and its effect, so no locks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

RESERVE = 256
"""Descriptors kept out of ``max_connections``: stdio and logs, the event loop's own (epoll, self-pipe),
listening sockets, model files held open by engines, the pipes or sockets to model instances' workers (a
few per instance), huggingface_hub download connections, refused connections still lingering
(``MAX_LINGERING``, 64) and one accept batch (asyncio accepts up to ``backlog``, 128, sockets before any of
them is capped)."""

UNLIMITED_TARGET = 65536  # the soft limit asked for where the hard limit is "unlimited" (not on Linux)

REFUSED_LINGER = 1.0
"""Seconds a refused connection stays half-closed after its 503, reading and discarding what the client
sends, so closing it does not reset the connection before the client has read the answer."""

MAX_LINGERING = 64  # refused connections lingering at once; beyond, the 503 is written and the socket closed

CODE = "too_many_connections"


def raise_open_files_limit() -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return UNLIMITED_TARGET * 16  # nothing to raise; any cap fits
    target = hard if hard != resource.RLIM_INFINITY else max(soft, UNLIMITED_TARGET)
    if target <= soft:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.debug("could not raise the open-files limit from %d to %d: %s", soft, target, exc)
        return soft
    log.debug("raised the open-files limit from %d to %d", soft, target)
    return target


def connection_cap(max_connections: int, open_files: int) -> int:
    """The connections the daemon may hold: ``max_connections``, or, where ``open_files`` cannot hold them
    plus ``RESERVE``, what it can (with one warning saying what to set)."""
    needed = max_connections + RESERVE
    if needed <= open_files:
        return max_connections
    cap = min(max_connections, max(open_files - RESERVE, open_files // 2, 1))
    log.warning(
        "the open-files limit (%d) cannot hold max_connections (%d) plus %d descriptors for models, logs and "
        "downloads: serving at most %d connections. Set LimitNOFILE=%d or more in the systemd unit (the shipped "
        "unit sets 65536; `ulimit -n` in a shell), or lower max_connections",
        open_files,
        max_connections,
        RESERVE,
        cap,
        needed,
    )
    return cap


def refusal(limit: int) -> bytes:
    """The whole HTTP answer to a connection over the cap: 503, the OpenAI error envelope, then close."""
    body = json.dumps(
        {
            "error": {
                "message": f"too many open connections (max_connections is {limit}, all busy): try again shortly",
                "type": "server_error",
                "param": None,
                "code": CODE,
            }
        }
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n"
        "\r\n"
    )
    return head.encode() + body


def _waiting_for_request(handler: Any) -> bool:
    """Whether aiohttp's protocol is idle: its loop waits for the next request's headers and holds none.
    This is aiohttp's own test in ``RequestHandler._process_keepalive``, on private state; if a future
    aiohttp renames it, nothing counts as idle and over-limit connections get the 503 (the safe side)."""
    waiter = getattr(handler, "_waiter", None)
    return isinstance(waiter, asyncio.Future) and not waiter.done()


class ConnectionCap:
    """A protocol factory for ``loop.create_server`` wrapping aiohttp's (``runner.server``).

    ``live`` holds the admitted connections, least recently active first (moved to the end on each
    received chunk). Event loop thread only (see the module's docstring).
    """

    def __init__(self, factory: Callable[[], asyncio.Protocol], limit: int) -> None:
        if limit < 1:
            raise ValueError("the connection cap must be at least 1")
        self.factory = factory
        self.limit = limit
        self.live: OrderedDict[_Capped, None] = OrderedDict()
        self.lingering: set[_Capped] = set()
        self.peak = 0  # most connections held at once
        self.evicted = 0  # idle connections closed to make room
        self.refused = 0  # connections answered 503
        self._logged_at: float | None = None
        self._logged = (0, 0)

    def __call__(self) -> asyncio.Protocol:
        return _Capped(self)

    @property
    def open(self) -> int:
        return len(self.live)

    def admit(self, connection: _Capped) -> bool:
        """Take ``connection`` if there is room or an idle connection to close for it."""
        if len(self.live) >= self.limit:
            if not self._evict_one():
                self.refused += 1
                self._report()
                return False
            self.evicted += 1
            self._report()
        self.live[connection] = None
        self.peak = max(self.peak, len(self.live))
        return True

    def _evict_one(self) -> bool:
        for connection in self.live:
            if connection.idle():
                del self.live[connection]  # stops iterating at once
                connection.close()
                return True
        return False

    def touch(self, connection: _Capped) -> None:
        if connection in self.live:
            self.live.move_to_end(connection)

    def forget(self, connection: _Capped) -> None:
        self.live.pop(connection, None)
        self.lingering.discard(connection)

    def close(self) -> None:
        """Close the refused connections still lingering (at shutdown; aiohttp closes its own)."""
        for connection in list(self.lingering):
            connection.close()

    def _report(self) -> None:
        """One warning when the cap is first reached, then at most one a minute with the counts."""
        now = asyncio.get_running_loop().time()
        if self._logged_at is None:
            log.warning(
                "max_connections (%d) reached: the least recently active idle connection is closed for each new "
                "one, and a new one is refused with 503 while every connection is busy",
                self.limit,
            )
        elif now - self._logged_at >= 60:
            log.warning(
                "max_connections (%d) reached: %d idle connections closed to make room, %d refused with 503, "
                "since the last report",
                self.limit,
                self.evicted - self._logged[0],
                self.refused - self._logged[1],
            )
        else:
            return
        self._logged_at, self._logged = now, (self.evicted, self.refused)


class _Capped(asyncio.Protocol):
    """One accepted connection: aiohttp's protocol behind it if admitted, else the 503 and a short linger."""

    __slots__ = ("_cap", "_handler", "_timer", "_transport")

    def __init__(self, cap: ConnectionCap) -> None:
        self._cap = cap
        self._handler: Any = None  # aiohttp's RequestHandler once admitted
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if self._cap.admit(self):
            self._handler = self._cap.factory()
            self._handler.connection_made(transport)
            return
        transport.write(refusal(self._cap.limit))
        if len(self._cap.lingering) >= MAX_LINGERING or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()  # FIN after the answer; keep reading until the client closes its side
        self._cap.lingering.add(self)
        self._timer = asyncio.get_running_loop().call_later(REFUSED_LINGER, transport.close)

    def idle(self) -> bool:
        return self._handler is not None and _waiting_for_request(self._handler)

    def close(self) -> None:
        if self._handler is not None:
            self._handler.force_close()  # what aiohttp's keep-alive timeout does to an idle connection
        elif self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        if self._handler is not None:
            self._cap.touch(self)
            self._handler.data_received(data)
        # a refused connection's request is read and dropped

    def eof_received(self) -> bool | None:
        if self._handler is not None:
            result: bool | None = self._handler.eof_received()
            return result
        return None  # refused: the client has read the answer and closed; the transport closes now

    def connection_lost(self, exc: Exception | None) -> None:
        self._cap.forget(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._handler is not None:
            self._handler.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()


class CappedTCPSite(web.BaseSite):
    """``web.TCPSite`` with its connections passed through a ``ConnectionCap`` (``self.cap``).

    aiohttp's TCPSite hands ``runner.server`` to ``loop.create_server`` itself; a ``BaseSite`` subclass
    (aiohttp's extension point, as its UnixSite and SockSite are) hands it the cap wrapping it instead.
    """

    __slots__ = ("_host", "_port", "cap")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, max_connections: int) -> None:
        super().__init__(runner)
        assert runner.server is not None  # BaseSite refuses a runner that was not set up
        self._host = host
        self._port = port
        self.cap = ConnectionCap(runner.server, max_connections)

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self.cap, self._host, self._port, backlog=self._backlog)

    async def stop(self) -> None:
        await super().stop()
        self.cap.close()
