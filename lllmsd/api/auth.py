"""Bearer-token authentication: with ``api_keys`` set (config or ``LLLMSD_API_KEYS``), every route but
``GET /health`` and ``GET /ready`` need ``Authorization: Bearer <key>``; anything else is a 401 in the OpenAI envelope.

The keys are read from the runtime's config on every request, so a reload that changes them applies at
once. Keys are compared as SHA-256 digests with ``hmac.compare_digest`` against every configured key
(no early exit), so neither the key's length nor which key matched shows in the response time. A key is
never logged: failures log only the reason.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from aiohttp import web

from lllmsd.api.keys import RUNTIME
from lllmsd.api.middleware import Handler
from lllmsd.errors import Unauthorized

log = logging.getLogger(__name__)

# Liveness and readiness probes (systemd, load balancers, container runtimes) carry no credentials and
# learn nothing but whether the daemon is up and ready.
OPEN_PATHS = frozenset({"/health", "/ready"})


class BearerUnauthorized(Unauthorized):
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="lllmsd"'}


def bearer_token(header: str) -> str | None:
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def key_matches(token: str, keys: list[bytes]) -> bool:
    """Whether ``token`` is one of ``keys`` (given as SHA-256 digests), in time independent of which."""
    digest = hashlib.sha256(token.encode()).digest()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(digest, key)
    return matched


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    keys = request.app[RUNTIME].config.api_keys
    if not keys or request.path in OPEN_PATHS:
        return await handler(request)
    token = bearer_token(request.headers.get("Authorization", ""))
    if token is None:
        raise BearerUnauthorized(
            "You didn't provide an API key. Send it in the Authorization header as 'Bearer YOUR_KEY'."
        )
    digests = [hashlib.sha256(k.get_secret_value().encode()).digest() for k in keys]
    if not key_matches(token, digests):
        log.info("rejected an invalid API key for %s %s", request.method, request.path)
        raise BearerUnauthorized("Incorrect API key provided.")
    return await handler(request)
