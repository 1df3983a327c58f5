"""lllmsd in a child process (create_app on a free loopback port), for benchmarks that drive it from
synchronous code between in-process measurements. The clients' CPU work stays off the daemon's event loop;
on a two-core machine they still share the cores, as real clients would."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import socket
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 180


def _serve(models: dict[str, Any], pipe: Connection) -> None:
    """Child process: run the daemon until the parent closes the pipe."""
    from aiohttp import web

    from lllmsd.app import create_app
    from lllmsd.config import parse_config

    async def main() -> None:
        config = parse_config({"models": models, "cache_dir": str(ROOT / ".cache" / "bench")})
        runner = web.AppRunner(create_app(config), handler_cancellation=True, access_log=None)
        await runner.setup()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        pipe.send(port)
        await asyncio.get_running_loop().run_in_executor(None, _until_closed, pipe)
        await runner.cleanup()

    asyncio.run(main())


def _until_closed(pipe: Connection) -> None:
    with contextlib.suppress(EOFError):  # the parent closed its end: time to stop
        pipe.recv_bytes()


class ChildDaemon:
    """lllmsd serving ``models`` in a child process, for as long as this object is open."""

    def __init__(self, models: dict[str, Any]) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(models, child), daemon=True)
        self._process.start()
        if not self._pipe.poll(START_TIMEOUT):
            self.close()
            raise RuntimeError("the daemon did not start")
        self.port: int = self._pipe.recv()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def close(self) -> None:
        self._pipe.close()
        self._process.join(30)
        if self._process.is_alive():
            self._process.terminate()
