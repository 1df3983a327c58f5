"""Probes and draining: what a balancer or an orchestrator asks before it sends a daemon traffic.

- ``GET /health`` (api/status.py) is liveness: it answers 200 while the process serves, draining or not,
  so an orchestrator never restarts a daemon that is only finishing its work.
- ``GET /ready`` is readiness: 200 only when every model with ``min_instances`` has a loaded instance and
  the daemon is not draining; else 503 in the error envelope, saying which.
- Draining (``Drain``, started by the first SIGTERM or SIGINT, see server.py): readiness fails at once,
  every new request but the probes and ``/metrics`` is answered 503 ``shutting_down`` with
  ``Connection: close`` (a balancer retries it on another daemon; nothing of it ran here), and the
  requests already in the daemon, queued or running, are finished. The server waits for them, up to
  ``shutdown_grace``, before it stops listening.

Concurrency rule: ``Drain`` is changed only on the event loop thread (the middleware, the signal
handler), so it needs no lock.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from lllmsd.api.keys import RUNTIME
from lllmsd.api.middleware import Handler, error_response
from lllmsd.core.instance import InstanceState
from lllmsd.core.runtime import Runtime

log = logging.getLogger(__name__)

# answered while draining: the orchestrator's probes and the metrics scrape say what is going on
PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})
_LOADED = (InstanceState.IDLE, InstanceState.BUSY)


class Drain:
    """Whether the daemon is draining, and how many requests (probes aside) it holds."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        if not self.draining:
            self.draining = True
            log.info("draining: new requests are refused, %d in the daemon are finished", self.in_flight)

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Until no request is in the daemon (True), or ``timeout`` seconds (False)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


DRAIN = web.AppKey("drain", Drain)


@web.middleware
async def drain_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PROBE_PATHS:
        return await handler(request)
    drain = request.app[DRAIN]
    if drain.draining:
        response = error_response(
            503,
            "the daemon is shutting down and takes no new requests; send this one to another daemon",
            "server_error",
            None,
            "shutting_down",
        )
        response.force_close()  # Connection: close, so a balancer does not reuse this connection either
        return response
    drain.enter()
    try:
        return await handler(request)
    finally:
        drain.leave()


def unready_models(runtime: Runtime) -> list[str]:
    """Models that should be loaded (``min_instances`` > 0) and have no loaded instance."""
    return [
        model_id
        for model_id, pool in runtime.pools.items()
        if pool.config.min_instances > 0 and not any(i.state in _LOADED for i in pool.instances)
    ]


async def ready(request: web.Request) -> web.Response:
    if request.app[DRAIN].draining:
        message = "not ready: the daemon is shutting down"
    elif loading := unready_models(request.app[RUNTIME]):
        message = f"not ready: no instance of {', '.join(loading)} is loaded yet"
    else:
        return web.json_response({"status": "ready"})
    return error_response(503, message, "server_error", None, "not_ready")
