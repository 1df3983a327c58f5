"""A model's worker process: one engine object, driven by the daemon over the protocol in protocol.py.

Started by the daemon (``python -m lllmsd.core.worker FD``, a fresh interpreter: never a fork of the
daemon and its threads) with its end of a socketpair as FD and stdout/stderr piped to the daemon, which
logs every line with the instance's id. Whatever the engine's C code does (a segfault in a grammar
parser, an abort, the OOM killer), only this process dies.

Threads: the main thread loads the engine and runs one call at a time; a reader thread receives the
daemon's messages, queues calls for the main thread and sets the running call's cancel event when a
Cancel arrives. An engine that serves several requests at once (``concurrency`` above 1: llama-cpp with
``slots``) gets a thread per call instead, and the pool sends it at most that many. Frames are sent under
``_sending``, so they never interleave. The worker exits when the daemon closes its end (after its calls
have stopped), and dies with the daemon (PR_SET_PDEATHSIG) if the daemon is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lllmsd.core.hosts import closing_if_closable
from lllmsd.core.worker.protocol import (
    BlockingChannel,
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
)
from lllmsd.engines.base import ModelFiles, TextEngine
from lllmsd.errors import LllmsdError

log = logging.getLogger("lllmsd.worker")

STREAMING = frozenset({"chat", "complete", "transcribe", "speak"})
COLLECTED_FRAME_EVENTS = 64  # events per frame of a collected answer: ~0.8 s of SmolLM2 tokens on 2 cores
STREAM_WINDOW = 0.02  # seconds: a streamed event sent sooner than this after the last frame waits for the next
PR_SET_PDEATHSIG = 1
CALL_STOP_SECONDS = 30.0  # how long the end of the worker waits for calls on threads of their own to stop


class Worker:
    def __init__(self, channel: BlockingChannel, clock: Callable[[], float] = time.monotonic) -> None:
        self.channel = channel
        self.clock = clock  # for STREAM_WINDOW (tests give their own)
        self.engine: Any = None
        self.calls: queue.Queue[Call | None] = queue.Queue()
        self.cancels: dict[int, threading.Event] = {}
        self.lock = threading.Lock()  # guards cancels, shared by the reader and the main thread
        self._sending = threading.Lock()  # one frame at a time on the channel
        self._call_threads: set[threading.Thread] = set()  # calls running on threads of their own

    def serve(self) -> None:
        self._load(self._first_message())
        threading.Thread(target=self._read, name="lllmsd-worker-reader", daemon=True).start()
        while (call := self.calls.get()) is not None:
            self._run(call)
        for thread in list(self._call_threads):  # cancelled by the reader: each stops within one token
            thread.join(CALL_STOP_SECONDS)
        self._close_engine()

    @property
    def concurrency(self) -> int:
        """Calls the engine runs at once (Engine.concurrency: 1 unless it serves several requests)."""
        return int(self.engine.concurrency)

    def _first_message(self) -> Load:
        message = self.channel.receive()
        if not isinstance(message, Load):
            raise ChannelClosed(f"expected Load, got {type(message).__name__}")
        return message

    def _load(self, load: Load) -> None:
        try:
            module_name, _, class_name = load.engine.partition(":")
            engine_class = getattr(importlib.import_module(module_name), class_name)
            files = ModelFiles(Path(load.path) if load.path is not None else None)
            self.engine = engine_class(load.config, files)
            cached = 0
            preload = load.preload
            if preload is not None and (preload.messages or preload.prefix) and isinstance(self.engine, TextEngine):
                cached = int(self.engine.preload(preload))
        except BaseException as exc:
            self.channel.send(Raised(0, _reportable(exc)))
            raise SystemExit(1) from None
        self.channel.send(Loaded(cached, os.getpid(), self.engine.context_size))

    def _read(self) -> None:
        """The reader thread: calls go to the main thread, cancels set the running call's event."""
        try:
            while True:
                message = self.channel.receive()
                if isinstance(message, Call):
                    with self.lock:
                        self.cancels[message.call_id] = threading.Event()
                    if self.concurrency > 1:
                        self._start_call_thread(message)
                    else:
                        self.calls.put(message)
                elif isinstance(message, Cancel):
                    with self.lock:
                        event = self.cancels.get(message.call_id)
                    if event is not None:
                        event.set()
        except ChannelClosed:
            pass
        # the daemon is gone or done with us: stop the running call, then the main loop
        with self.lock:
            for event in self.cancels.values():
                event.set()
        self.calls.put(None)

    def _start_call_thread(self, call: Call) -> None:
        thread = threading.Thread(target=self._run_on_thread, args=(call,), name=f"lllmsd-call-{call.call_id}")
        with self.lock:
            self._call_threads.add(thread)
        thread.start()

    def _run_on_thread(self, call: Call) -> None:
        try:
            self._run(call)
        except ChannelClosed:
            pass  # the daemon is gone: the reader ends the worker
        finally:
            with self.lock:
                self._call_threads.discard(threading.current_thread())

    def _run(self, call: Call) -> None:
        with self.lock:
            cancel = self.cancels[call.call_id]
        try:
            method = getattr(self.engine, call.method)
            if call.method in STREAMING:
                events: Iterator[Any] = method(call.job, cancel)
                # only a chat job says whether its client collects the answer; every other one streams
                with closing_if_closable(events):  # an engine gives back what the call held (a slot) at once
                    self._send_events(call.call_id, events, cancel, stream=getattr(call.job, "stream", True))
                self._send(Finished(call.call_id))
            else:
                self._send(Returned(call.call_id, method(call.job)))
        except ChannelClosed:
            raise
        except BaseException as exc:
            self._send(Raised(call.call_id, _reportable(exc)))
        finally:
            with self.lock:
                self.cancels.pop(call.call_id, None)

    def _send_events(self, call_id: int, events: Iterator[Any], cancel: threading.Event, *, stream: bool) -> None:
        """A call's events, several to a frame, since each frame wakes the daemon and takes a core from the
        engine's threads. A streamed event goes at once unless a frame went less than STREAM_WINDOW ago;
        then it waits for the next event (one token's time at most) and both go together, so tokens faster
        than the window wake the daemon about once per window, and slower events (a large model's tokens,
        transcript segments, spoken sentences) all go at once. An answer the client collects whole goes
        COLLECTED_FRAME_EVENTS to a frame. An error raised mid-way still sends what came before it (the
        daemon then reports the error)."""
        pending: list[Any] = []
        last_sent = -STREAM_WINDOW
        try:
            for event in events:
                if cancel.is_set():
                    break
                pending.append(event)
                if stream:
                    now = self.clock()
                    due = now - last_sent >= STREAM_WINDOW
                    if due:
                        last_sent = now
                else:
                    due = len(pending) >= COLLECTED_FRAME_EVENTS
                if due:
                    self._send_frame(call_id, pending)
        finally:
            self._send_frame(call_id, pending)

    def _send_frame(self, call_id: int, pending: list[Any]) -> None:
        if len(pending) == 1:
            self._send(Emitted(call_id, pending[0]))
        elif pending:
            self._send(EmittedMany(call_id, tuple(pending)))
        pending.clear()

    def _send(self, message: object) -> None:
        with self._sending:
            self.channel.send(message)

    def _close_engine(self) -> None:
        if self.engine is not None:
            with contextlib.suppress(Exception):
                self.engine.close()


def _reportable(exc: BaseException) -> BaseException:
    if isinstance(exc, LllmsdError):
        return exc
    return EngineFailure(type(exc).__name__, str(exc)[:2000], "".join(traceback.format_exception(exc))[-8000:])


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the daemon dies, so a killed daemon leaves no orphan holding
    gigabytes of weights."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the daemon died before prctl took effect
        raise SystemExit(0)


def main(argv: list[str]) -> int:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the daemon decides
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    channel = BlockingChannel(socket.socket(fileno=int(argv[0])))
    try:
        Worker(channel).serve()
    except ChannelClosed:
        return 0
    return 0
