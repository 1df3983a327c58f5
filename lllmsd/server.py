"""Running the app: listening, signals, systemd notifications, reload and graceful shutdown.

The server runs the app with AppRunner/TCPSite rather than ``web.run_app`` so it knows the moment the
socket listens (READY=1 goes to systemd then, not before) and can handle SIGHUP itself.

Signals: SIGINT/SIGTERM drain, then stop (api/probes.py). At once: STOPPING=1, ``GET /ready`` answers
503, and every new request 503 ``shutting_down`` with ``Connection: close``, so a balancer sends it to
another daemon; the daemon keeps listening meanwhile (an orchestrator's endpoint list lags behind the
signal, and a refused connection would cost a request that a 503 does not). The requests already in the
daemon get ``shutdown_grace`` seconds to finish; then the daemon stops listening, whatever still runs is
cancelled, and every instance is disposed. A second SIGINT/SIGTERM ends the wait at once. SIGHUP re-reads
the config file (RELOADING=1, then READY=1 with a STATUS line saying what changed or why the new file was
refused).

Connections: the site is a ``connections.CappedTCPSite``: at most ``max_connections`` are held (at the cap
the least recently active idle one is closed to make room, and a new one is refused with 503 only when all
are busy), after the soft open-files limit has been raised to the hard one (``listen``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any

from aiohttp import web

from lllmsd.api.keys import RUNTIME
from lllmsd.api.probes import DRAIN, Drain
from lllmsd.app import create_app
from lllmsd.config import ConfigError, DaemonConfig, load_config
from lllmsd.connections import CappedTCPSite, connection_cap, raise_open_files_limit
from lllmsd.core.runtime import ReloadResult, Runtime
from lllmsd.notify import Notifier

log = logging.getLogger(__name__)

LINGERING_TIME = 10.0  # aiohttp's default: how long an unread request body is drained after the response
# After the drain's grace: how long a request still running gets to unwind once it is cancelled (the
# grace itself is the drain's: runtime.config.shutdown_grace, read when the signal comes, so a reload applies)
CANCEL_TIMEOUT = 2.0


def run_server(
    config: DaemonConfig,
    *,
    config_path: Path,
    host: str | None = None,
    port: int | None = None,
    pid_file: Path | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM."""
    if pid_file is not None:
        pid_file.write_text(f"{os.getpid()}\n", encoding="utf-8")
    try:
        asyncio.run(serve(config, config_path=config_path.resolve(), host=host, port=port))
    finally:
        if pid_file is not None:
            with contextlib.suppress(OSError):
                pid_file.unlink()


async def serve(
    config: DaemonConfig,
    *,
    config_path: Path,
    host: str | None = None,
    port: int | None = None,
    notifier: Notifier | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM; ``config_path`` (absolute) is re-read on SIGHUP."""
    notifier = notifier or Notifier()
    app = create_app(config, base_dir=config_path.parent)
    runtime = app[RUNTIME]
    drain = app[DRAIN]
    runner = make_runner(app, config)
    await runner.setup()  # starts the runtime (min instances begin loading in the background)
    stop = asyncio.Event()
    hurry = asyncio.Event()  # a second signal: stop waiting for the requests in the daemon
    try:
        await listen(runner, config, host, port)
        url = _url(runner)
        log.info("lllmsd serving %d models on %s/v1 (pid %d)", len(config.models), url, os.getpid())
        for path, message in config.warnings():
            log.warning("config: %s: %s", path, message)
        _install_signals(stop, hurry, drain, runtime, config_path, notifier)
        notifier.ready(f"serving {len(config.models)} models on {url}")
        await stop.wait()
        grace = runtime.config.shutdown_grace
        log.info("shutting down: %d requests in the daemon get %gs to finish", drain.in_flight, grace)
        notifier.stopping(f"stopping: requests in the daemon get {grace:g}s to finish")
        await _drained(drain, hurry, grace)
    finally:
        _remove_signals()
        await runner.cleanup()


def make_runner(app: web.Application, config: DaemonConfig) -> web.AppRunner:
    """The app's runner, with the settings `lllmsd serve` uses."""
    return web.AppRunner(
        app,
        access_log=None,  # our middleware logs one line per request, with the model and request id
        handler_cancellation=True,  # a client that goes away cancels its request (and its generation)
        shutdown_timeout=CANCEL_TIMEOUT,  # the grace was the drain's (serve)
        **protocol_options(config),
    )


async def listen(
    runner: web.AppRunner, config: DaemonConfig, host: str | None = None, port: int | None = None
) -> CappedTCPSite:
    """Listen on ``host``:``port`` (default: the config's) with at most ``max_connections`` connections.

    Raises the soft open-files limit to the hard one first; if that cannot hold ``max_connections`` plus
    the reserve, one warning says what to set and the cap is lowered to fit (connections.connection_cap).
    ``max_connections`` is read here only: changing it needs a restart.
    """
    cap = connection_cap(config.max_connections, raise_open_files_limit())
    site = CappedTCPSite(
        runner, host or config.listen.host, config.listen.port if port is None else port, max_connections=cap
    )
    await site.start()
    return site


def protocol_options(config: DaemonConfig) -> dict[str, Any]:
    """Connection settings that keep slow or idle clients from holding connections (slow-loris): aiohttp
    closes a connection that has not completed a request's headers ``client_timeout`` seconds after it
    opened or after its last response; read_json bounds the body in time the same way, and after an error
    answer the rest of an unread body is drained for at most as long (aiohttp's lingering_time, 10 s)."""
    return {"keepalive_timeout": config.client_timeout, "lingering_time": min(LINGERING_TIME, config.client_timeout)}


def _url(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def _drained(drain: Drain, hurry: asyncio.Event, grace: float) -> None:
    """Until the requests in the daemon have finished, ``grace`` seconds have passed, or ``hurry`` is set."""
    idle = asyncio.ensure_future(drain.wait_idle(grace))
    hurried = asyncio.ensure_future(hurry.wait())
    await asyncio.wait((idle, hurried), return_when=asyncio.FIRST_COMPLETED)
    for task in (idle, hurried):
        task.cancel()
    if drain.in_flight:
        log.warning("%d requests still running after the drain; cancelling them", drain.in_flight)


def _install_signals(
    stop: asyncio.Event, hurry: asyncio.Event, drain: Drain, runtime: Runtime, config_path: Path, notifier: Notifier
) -> None:
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[ReloadResult | None]] = set()

    def on_hup() -> None:
        task = loop.create_task(reload_from_file(runtime, config_path, notifier))
        reloads.add(task)  # keep a reference until it finishes
        task.add_done_callback(reloads.discard)

    def on_stop() -> None:
        if stop.is_set():
            hurry.set()
            return
        drain.start()  # here, not when serve() wakes: not ready, and refusing, from this very moment
        stop.set()

    loop.add_signal_handler(signal.SIGINT, on_stop)
    loop.add_signal_handler(signal.SIGTERM, on_stop)
    loop.add_signal_handler(signal.SIGHUP, on_hup)


def _remove_signals() -> None:
    loop = asyncio.get_running_loop()
    for sig in _SIGNALS:
        loop.remove_signal_handler(sig)


async def reload_from_file(runtime: Runtime, path: Path, notifier: Notifier | None = None) -> ReloadResult | None:
    """Re-read ``path`` and apply it. A file that does not load is refused with every problem logged, and
    the running config keeps serving; returns None then."""
    notifier = notifier or Notifier({})
    notifier.reloading()
    log.info("reloading %s", path)
    try:
        # reading the file and importing engine libraries for the check: not on the event loop
        config = await asyncio.to_thread(load_config, path)
        result = await runtime.reload(config)
    except ConfigError as exc:
        log.error(
            "reload refused, still serving the previous config: %s is invalid:\n  %s", path, "\n  ".join(exc.lines())
        )
        notifier.ready(f"reload refused ({len(exc.problems)} problems in {path}); serving the previous config")
        return None
    except Exception as exc:
        log.exception("reload refused, still serving the previous config")
        notifier.ready(f"reload refused ({type(exc).__name__}); serving the previous config")
        return None
    log.info("reloaded %s: %s", path, result.summary())
    notifier.ready(f"reloaded: {result.summary()}; serving {len(runtime.pools)} models")
    return result
