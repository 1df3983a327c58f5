"""Typed application keys: the app's state, set by create_app (no module globals)."""

from __future__ import annotations

from aiohttp import web

from lllmsd.core.response_store import ResponseStore
from lllmsd.core.runtime import Runtime

# the running config is runtime.config: a reload replaces it, so no copy of it is kept here
RUNTIME = web.AppKey("runtime", Runtime)
# the Responses API's stored responses (a SQLite file; opened on first use)
RESPONSE_STORE = web.AppKey("response_store", ResponseStore)

# per-request values the middlewares and handlers share
REQUEST_ID = web.RequestKey("request_id", str)
MODEL = web.RequestKey("model", str)
SESSION = web.RequestKey("session", str)  # the client's session id (api/session.py), when it sent one
