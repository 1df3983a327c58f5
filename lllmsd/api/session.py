"""The session header (``session_header`` in the config, ``X-Session-Id`` by default).

A client that names its conversation sends the same value with every turn. The daemon echoes it on the
response and hands it to the pool as an affinity key: the turn goes to the instance that served the
session last, whose context still holds it (core/pool.py). A balancer in front of several daemons hashes
on the same header so the turn reaches this daemon in the first place (docs/scale-out.md).

The header is read from the running config on every request, so a reload that renames it applies at once.
"""

from __future__ import annotations

import re

from aiohttp import web

from lllmsd.api.keys import RUNTIME, SESSION
from lllmsd.api.middleware import Handler
from lllmsd.errors import InvalidRequest

MAX_SESSION_LENGTH = 256
# visible ASCII: a session id is an opaque key, never text to show, and it is echoed in a header
_SESSION_ID = re.compile(rf"^[\x21-\x7e]{{1,{MAX_SESSION_LENGTH}}}$")


@web.middleware
async def session_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    header = request.app[RUNTIME].config.session_header
    value = request.headers.get(header, "")
    if value:
        if not _SESSION_ID.match(value):
            raise InvalidRequest(
                f"the {header} header must be 1 to {MAX_SESSION_LENGTH} visible ASCII characters",
                param=header,
                code="invalid_value",
            )
        request[SESSION] = value
    return await handler(request)


async def echo_session(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the session id goes back on every response of its request, streams included."""
    session = request.get(SESSION)
    if session is not None:
        response.headers[request.app[RUNTIME].config.session_header] = session
