"""The daemon's side of a worker process: start it, talk to it, watch it, and kill it when it must go.

``WorkerProcess`` is an engine host (core/hosts.py) whose engine lives in another process. What the
daemon guarantees with it:
- a worker that dies (a signal, an abort, the OOM killer) fails only its own call, with an error naming
  how it died, and marks itself dead: the pool replaces the instance, other models are untouched;
- a call whose consumer left (client gone) is cancelled; if the worker has not finished it within
  ``cancel_grace`` seconds (a grammar build, a stuck C call), the worker is killed;
- ``close`` never waits longer than its grace either: the engine gets to free itself, then SIGKILL;
- everything the worker writes to stdout and stderr is logged line by line, prefixed with the instance
  id, clipped, with control characters escaped, and rate-limited, so nothing a client sends (a grammar
  an engine echoes) becomes a log line of its own or floods the log.

Concurrency rule: every method runs on the event loop thread. One call at a time per worker (the pool
hands an instance to one request at a time), or up to ``slots`` for an engine that serves several at once;
``_calls`` routes the worker's answers to each by its call id.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from lllmsd.core.deadline import TIME_UP, Deadline
from lllmsd.core.jobs import Job, Preload
from lllmsd.core.worker.protocol import (
    HEADER,
    Call,
    Cancel,
    ChannelClosed,
    Emitted,
    EmittedMany,
    EngineFailure,
    Finished,
    Load,
    Loaded,
    Raised,
    Returned,
    decode_length,
    encode,
)
from lllmsd.engines.base import ModelFiles
from lllmsd.errors import EngineError, LllmsdError, ModelUnavailable

log = logging.getLogger(__name__)

LOG_LINE_LIMIT = 500  # characters of one line the worker wrote
LOG_BURST = 200  # lines per LOG_WINDOW before the rest are counted, not logged
LOG_WINDOW = 10.0


class WorkerDied(EngineError):
    """The worker process ended while it had work (or before it loaded)."""

    code = "worker_died"


class _End:
    """The call's answer has arrived (Finished, or Returned with ``value``)."""

    def __init__(self, value: Any = None) -> None:
        self.value = value


class WorkerProcess:
    def __init__(self, instance_id: str, engine: str, *, cancel_grace: float) -> None:
        self.instance_id = instance_id
        self.engine = engine  # "module:Class"
        self.cancel_grace = cancel_grace
        self.pid: int | None = None
        self.dead: str | None = None  # why the worker is gone, once it is
        self.context_size: int | None = None  # the engine's context window, once loaded
        self._process: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        self._calls: dict[int, asyncio.Queue[Any]] = {}
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task[Any]] = []
        self._loaded: asyncio.Future[int] | None = None

    # ------------------------------------------------------------------------------------ lifecycle

    async def load(self, config: Any, files: ModelFiles, preload: Preload | None) -> int:
        """Start the worker and load the engine in it; returns the tokens the preload cached."""
        ours, theirs = socket.socketpair()
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "lllmsd.core.worker",
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=_worker_environment(),
            )
        finally:
            theirs.close()
        self.pid = self._process.pid
        self._reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        loop = asyncio.get_running_loop()
        self._loaded = loop.create_future()
        self._tasks = [
            asyncio.ensure_future(self._read_frames()),
            asyncio.ensure_future(self._read_output()),
            asyncio.ensure_future(self._watch_exit()),
        ]
        path = str(files.path) if files.path is not None else None
        await self._send(Load(self.engine, config, path, preload))
        return await self._loaded

    async def close(self, grace: float) -> None:
        """Let the engine free itself (the worker exits when its connection closes), then kill it if it
        has not exited within ``grace`` seconds."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
        process = self._process
        if process is not None and process.returncode is None:
            try:
                await asyncio.wait_for(process.wait(), grace)
            except asyncio.TimeoutError:
                log.warning("instance %s: worker %s did not exit in %gs; killing it", self.instance_id, self.pid, grace)
                self.kill()
                with contextlib.suppress(Exception):
                    await process.wait()
        # the readers end by themselves at the end of their streams, which closes the transport (an
        # unclosed one warns when it is collected); give them a moment, then stop them
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 1.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signal.SIGKILL)

    # ------------------------------------------------------------------------------------------ calls

    async def stream(self, method: str, job: Job, deadline: Deadline) -> AsyncIterator[Any]:
        """Run a streaming engine method in the worker, yielding its events as they arrive. Closing the
        iterator early cancels the call; a worker that does not finish it within the grace is killed.
        At ``deadline`` the call is cancelled and ``deadline.error`` raised."""
        call_id, answers = self._open_call()
        disarm = deadline.arm(answers)
        finished = False
        try:
            await self._send(Call(call_id, method, job))
            while True:
                item = await answers.get()
                if isinstance(item, _End):
                    finished = True
                    return
                if isinstance(item, _Failure):
                    finished = True  # the call has ended (or the worker with it): nothing to cancel
                    raise item.error
                if item is TIME_UP:
                    raise deadline.error()
                yield item
        finally:
            disarm()
            if not finished:
                await self._stop(call_id, answers)
            self._calls.pop(call_id, None)

    async def call(self, method: str, job: Job, deadline: Deadline) -> Any:
        """Run a non-streaming engine method (embed) in the worker and return its result."""
        call_id, answers = self._open_call()
        disarm = deadline.arm(answers)
        try:
            await self._send(Call(call_id, method, job))
            item = await answers.get()
            if isinstance(item, _Failure):
                raise item.error
            if item is TIME_UP:
                await self._stop(call_id, answers)
                raise deadline.error()
            return item.value
        except asyncio.CancelledError:
            await self._stop(call_id, answers)
            raise
        finally:
            disarm()
            self._calls.pop(call_id, None)

    def _open_call(self) -> tuple[int, asyncio.Queue[Any]]:
        if self.dead is not None:
            raise WorkerDied(f"the model's worker process is gone ({self.dead})")
        call_id = next(self._ids)
        answers: asyncio.Queue[Any] = asyncio.Queue()
        self._calls[call_id] = answers
        return call_id, answers

    async def _stop(self, call_id: int, answers: asyncio.Queue[Any]) -> None:
        """Cancel a call nobody waits for any more; kill the worker if it does not end it in time."""
        if self.dead is not None:
            return
        with contextlib.suppress(Exception):
            await self._send(Cancel(call_id))
        deadline = time.monotonic() + self.cancel_grace
        try:
            while True:
                item = await asyncio.wait_for(answers.get(), max(0.0, deadline - time.monotonic()))
                if isinstance(item, _End | _Failure):
                    return  # TIME_UP and late events are skipped: only the call's end counts
        except asyncio.TimeoutError:
            log.warning(
                "instance %s: worker %s did not stop a cancelled call within %gs; killing it",
                self.instance_id,
                self.pid,
                self.cancel_grace,
            )
            self.dead = f"killed after not stopping a cancelled call within {self.cancel_grace:g}s"
            self.kill()

    async def _send(self, message: object) -> None:
        if self._writer is None or self.dead is not None:
            raise WorkerDied(f"the model's worker process is gone ({self.dead or 'not started'})")
        try:
            self._writer.write(encode(message))
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            raise WorkerDied(f"the model's worker process is gone ({exc})") from None

    # ---------------------------------------------------------------------------------------- readers

    async def _read_frames(self) -> None:
        assert self._reader is not None
        try:
            while True:
                header = await self._reader.readexactly(HEADER.size)
                payload = await self._reader.readexactly(decode_length(header))
                self._deliver(pickle.loads(payload))  # our own worker wrote it (see protocol.py)
        except (asyncio.IncompleteReadError, ConnectionError, ChannelClosed):
            pass  # the worker exited or its pipe broke: _watch_exit reports how

    def _deliver(self, message: object) -> None:
        if isinstance(message, Loaded):
            if self._loaded is not None and not self._loaded.done():
                self.context_size = message.context_size
                self._loaded.set_result(message.cached_tokens)
        elif isinstance(message, Raised) and message.call_id == 0:
            if self._loaded is not None and not self._loaded.done():
                self._loaded.set_exception(self._error(message.error, loading=True))
        elif isinstance(message, Emitted | EmittedMany | Returned | Finished | Raised):
            answers = self._calls.get(message.call_id)
            if answers is None:
                return  # an answer to a call abandoned after the grace
            if isinstance(message, Emitted):
                answers.put_nowait(message.event)
            elif isinstance(message, EmittedMany):
                for event in message.events:
                    answers.put_nowait(event)
            elif isinstance(message, Returned):
                answers.put_nowait(_End(message.value))
            elif isinstance(message, Finished):
                answers.put_nowait(_End())
            else:
                answers.put_nowait(_Failure(self._error(message.error, loading=False)))

    def _error(self, error: BaseException, *, loading: bool) -> BaseException:
        if isinstance(error, LllmsdError):
            return error
        if isinstance(error, EngineFailure):
            log.error("instance %s: the engine failed in its worker:\n%s", self.instance_id, error.traceback)
            if loading:
                return ModelUnavailable(f"the engine failed to load: {error.type_name}: {error.text}")
            return EngineError(f"the engine failed ({error.type_name}); the daemon logged the details")
        return EngineError(f"the engine failed ({type(error).__name__}); the daemon logged the details")

    async def _watch_exit(self) -> None:
        assert self._process is not None
        code = await self._process.wait()
        self.dead = _how_it_ended(code)
        if code != 0:
            log.error("instance %s: worker %s %s", self.instance_id, self.pid, self.dead)
        error = WorkerDied(f"the model's worker process {self.dead}")
        if self._loaded is not None and not self._loaded.done():
            self._loaded.set_exception(ModelUnavailable(f"the model's worker process {self.dead} while loading"))
        for answers in self._calls.values():
            answers.put_nowait(_Failure(error))

    async def _read_output(self) -> None:
        """Log what the worker writes: its Python logging, and whatever its C libraries print."""
        assert self._process is not None
        assert self._process.stdout is not None
        stream = self._process.stdout
        limiter = _LineLimiter()
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line longer than the stream's buffer: read on, clipped
                line = await stream.read(1 << 16)
            if not line:
                return
            if limiter.admit():
                level, text = _classify(line)
                log.log(level, "[%s] %s", self.instance_id, _clip(text))
            if (dropped := limiter.dropped_now()) is not None:
                log.warning("[%s] %d more lines from the worker were not logged", self.instance_id, dropped)

    # ---------------------------------------------------------------------------------------- status

    def memory(self) -> dict[str, int] | None:
        """Resident and proportional set size of the worker, in bytes (PSS splits the pages workers of
        one model share, such as mmapped weights, between them)."""
        if self.pid is None or self.dead is not None:
            return None
        return {"pid": self.pid, **process_memory(self.pid)}


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _how_it_ended(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the kernel's OOM killer, or an operator)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {code}"


def _classify(line: bytes) -> tuple[int, str]:
    text = line.decode("utf-8", errors="replace").rstrip("\n")
    first, _, rest = text.partition(" ")
    level = logging.getLevelName(first)
    if isinstance(level, int) and rest:
        return level, rest
    return logging.INFO, text


def _clip(text: str) -> str:
    """One log line: control characters escaped (no forged lines), at most LOG_LINE_LIMIT characters."""
    safe = text.encode("unicode_escape", errors="backslashreplace").decode("ascii")
    return safe if len(safe) <= LOG_LINE_LIMIT else f"{safe[:LOG_LINE_LIMIT]}... ({len(safe)} characters)"


class _LineLimiter:
    """At most LOG_BURST lines per LOG_WINDOW seconds; the rest are counted and reported once."""

    def __init__(self) -> None:
        self.window_start = time.monotonic()
        self.count = 0
        self.dropped = 0

    def admit(self) -> bool:
        now = time.monotonic()
        if now - self.window_start >= LOG_WINDOW:
            self.window_start, self.count = now, 0
        self.count += 1
        if self.count <= LOG_BURST:
            return True
        self.dropped += 1
        return False

    def dropped_now(self) -> int | None:
        """The dropped count, once the window that dropped them has ended."""
        if self.dropped and time.monotonic() - self.window_start >= LOG_WINDOW:
            dropped, self.dropped = self.dropped, 0
            return dropped
        return None


def process_memory(pid: int) -> dict[str, int]:
    """RSS and PSS of a process from /proc (Linux), in bytes; empty if it cannot be read."""
    found: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("Rss", "Pss"):
                found[f"{key.lower()}_bytes"] = int(value.split()[0]) * 1024
    return found


def _worker_environment() -> dict[str, str]:
    """The daemon's environment, with the package importable from wherever the daemon runs."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env
