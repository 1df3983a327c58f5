"""One whole daemon shared by the tests of a module, for the modules whose every test would otherwise
start its own daemon and wait for the same real models to load in fresh worker processes.

``ThreadedDaemon`` runs ``create_app`` on a loopback port from a thread of its own, with its own event
loop, so a module-scoped fixture can hold it while each test runs on its own function-scoped loop and
talks to it over HTTP through ``RemoteClient`` (the subset of aiohttp's ``TestClient`` the tests use:
``get``, ``post``, ``request``, ``make_url``). Log records from the daemon's thread reach ``caplog`` as
any other (logging is process-wide).

A shared daemon carries what one test did into the next (loaded instances, the KV cache, counters):
modules that use it assert only what holds whatever ran before, as a long-running daemon must.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from lllmsd.app import create_app
from lllmsd.config import DaemonConfig

START_SECONDS = 60.0  # binding a port and starting the app; models load on first use, not here


class ThreadedDaemon:
    """``create_app(config)`` serving on 127.0.0.1 from its own thread and event loop."""

    def __init__(self, config: DaemonConfig, **app_options: Any) -> None:
        self._config = config
        self._app_options = app_options
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="shared-daemon", daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = URL()

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(START_SECONDS)

    def stop(self) -> None:
        try:
            if self._runner is not None:
                # the app's cleanup closes every pool (and their worker processes) within its grace
                asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    async def _start(self) -> None:
        app = create_app(self._config, **self._app_options)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = URL.build(scheme="http", host=host, port=port)


@contextmanager
def shared_daemon(config: DaemonConfig, **app_options: Any) -> Iterator[ThreadedDaemon]:
    daemon = ThreadedDaemon(config, **app_options)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


class RemoteClient:
    """A test's HTTP client to a shared daemon, shaped like the parts of aiohttp's TestClient tests use."""

    def __init__(self, base: URL) -> None:
        self._base = base
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))

    def make_url(self, path: str) -> URL:
        return self._base.join(URL(path))

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.session.request(method, self.make_url(path), **kwargs)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    async def close(self) -> None:
        await self.session.close()

    async def __aenter__(self) -> RemoteClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
