"""Running the app: listening, signals and graceful shutdown."""

from __future__ import annotations

import logging
from pathlib import Path

from aiohttp import web

from lllmsd.app import create_app
from lllmsd.config import DaemonConfig

log = logging.getLogger(__name__)


def run_server(config: DaemonConfig, *, config_path: Path, host: str | None = None, port: int | None = None) -> None:
    """Serve until SIGINT/SIGTERM. On a signal aiohttp stops accepting connections, the runtime lets
    running requests finish for ``shutdown_grace`` seconds, then every instance is disposed."""
    app = create_app(config, base_dir=config_path.resolve().parent)
    host = host or config.listen.host
    port = port or config.listen.port
    log.info("lllmsd serving %d models on http://%s:%d/v1", len(config.models), host, port)
    web.run_app(
        app,
        host=host,
        port=port,
        print=None,
        access_log=None,  # our middleware logs one line per request, with the model and request id
        handler_cancellation=True,  # a client that goes away cancels its request (and its generation)
        shutdown_timeout=config.shutdown_grace,
    )
