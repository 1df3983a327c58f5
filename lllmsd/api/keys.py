"""Typed application keys: the app's state, set by create_app (no module globals)."""

from __future__ import annotations

from aiohttp import web

from lllmsd.config import DaemonConfig
from lllmsd.core.runtime import Runtime

CONFIG = web.AppKey("config", DaemonConfig)
RUNTIME = web.AppKey("runtime", Runtime)

# per-request values the middlewares and handlers share
REQUEST_ID = web.RequestKey("request_id", str)
MODEL = web.RequestKey("model", str)
