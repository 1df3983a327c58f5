"""The framed protocol between the daemon and a model's worker process.

One connected Unix socket per worker (a socketpair made by the daemon; the worker gets its end by file
descriptor). Each frame is a 4-byte big-endian length and a pickled message. Both ends are ours, started
from the same installation, so pickle is safe here and carries the jobs, events and errors unchanged
(``lllmsd.errors`` exceptions pickle with their status, code and param).

The conversation:

    daemon                                  worker
    Load(engine, config, files, preload) ->
                                         <- Loaded(cached_tokens)            or Raised(0, error)
    Call(id, method, job) ->
                                         <- Emitted(id, event)...            (stream methods; events that
                                         <- EmittedMany(id, events)...        come close together share one)
                                         <- Returned(id, value)              (embed) or Finished(id)
                                         <- Raised(id, error)                (the call failed)
    Cancel(id) ->                           the call stops within one token, then Finished(id)

A call is answered by exactly one Returned, Finished or Raised. At most one call runs at a time (the
pool hands an instance to one request at a time). The daemon closing its end stops the worker.
"""

from __future__ import annotations

import pickle
import socket
import struct
from dataclasses import dataclass
from typing import Any

from lllmsd.core.jobs import Job, Preload

HEADER = struct.Struct(">I")
MAX_FRAME = 1 << 30  # a frame is a job or an event: far below this; a larger length is a broken stream


class ChannelClosed(Exception):
    """The other end went away (the worker died, or the daemon closed the connection)."""


# ---------------------------------------------------------------------------------- daemon -> worker


@dataclass(frozen=True, slots=True)
class Load:
    engine: str  # "module:Class"
    config: Any  # the model's config (a pydantic ModelBase subclass)
    path: str | None  # where the store put the weights
    preload: Preload | None


@dataclass(frozen=True, slots=True)
class Call:
    call_id: int
    method: str  # chat | complete | embed | transcribe | speak
    job: Job


@dataclass(frozen=True, slots=True)
class Cancel:
    call_id: int


# ---------------------------------------------------------------------------------- worker -> daemon


@dataclass(frozen=True, slots=True)
class Loaded:
    cached_tokens: int
    pid: int
    context_size: int | None = None  # the engine's context window (Engine.context_size)


@dataclass(frozen=True, slots=True)
class Emitted:
    call_id: int
    event: Any


@dataclass(frozen=True, slots=True)
class EmittedMany:
    """Several events of one call in one frame: a frame per token would wake the daemon at every token,
    taking a core from the engine's threads (the worker's ``_send_events`` says when events share one)."""

    call_id: int
    events: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Returned:
    call_id: int
    value: Any


@dataclass(frozen=True, slots=True)
class Finished:
    call_id: int


@dataclass(frozen=True, slots=True)
class Raised:
    """The call failed. ``error`` is the engine's ``LllmsdError`` (a problem with the request), or an
    ``EngineFailure`` for anything else (the engine is in an unknown state)."""

    call_id: int
    error: BaseException


@dataclass(frozen=True, slots=True)
class EngineFailure(Exception):
    """An unexpected exception in the worker, as text: its type, message and traceback (for the log)."""

    type_name: str
    text: str
    traceback: str

    def __str__(self) -> str:
        return f"{self.type_name}: {self.text}"


# ------------------------------------------------------------------------------------------ frames


def encode(message: object) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(payload)) + payload


def decode_length(header: bytes) -> int:
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ChannelClosed(f"frame of {length} bytes: the stream is broken")
    return length


class BlockingChannel:
    """The worker's end: blocking reads and writes on its socket (reads on one thread, writes on
    another: a socket allows that)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def send(self, message: object) -> None:
        try:
            self._sock.sendall(encode(message))
        except OSError as exc:
            raise ChannelClosed(str(exc)) from None

    def receive(self) -> object:
        length = decode_length(self._read(HEADER.size))
        return pickle.loads(self._read(length))

    def _read(self, size: int) -> bytes:
        chunks = []
        while size:
            try:
                chunk = self._sock.recv(min(size, 1 << 20))
            except OSError as exc:
                raise ChannelClosed(str(exc)) from None
            if not chunk:
                raise ChannelClosed("end of stream")
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)
