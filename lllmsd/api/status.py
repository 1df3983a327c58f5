"""GET / (what the daemon is doing) and GET /health (is it up)."""

from __future__ import annotations

from aiohttp import web

from lllmsd import __version__
from lllmsd.api.keys import RUNTIME


async def status(request: web.Request) -> web.Response:
    return web.json_response({"name": "lllmsd", "version": __version__, **request.app[RUNTIME].status()})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})
