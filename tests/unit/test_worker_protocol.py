"""The worker protocol's pure parts: frames, errors crossing the process boundary, and what the daemon
makes of the lines a worker writes."""

from __future__ import annotations

import contextlib
import logging
import pickle
import socket
import threading
from collections.abc import Iterator

import pytest

from lllmsd.core.jobs import ChatJob, ChatMessage, Sampling, TextDelta
from lllmsd.core.worker import process
from lllmsd.core.worker.protocol import (
    BlockingChannel,
    Call,
    ChannelClosed,
    Emitted,
    EmittedMany,
    decode_length,
    encode,
)
from lllmsd.errors import ContextLengthExceeded, ModelUnavailable, UnsupportedParameter


def test_frames_carry_jobs_and_events_unchanged() -> None:
    ours, theirs = socket.socketpair()
    sender, receiver = BlockingChannel(ours), BlockingChannel(theirs)
    job = ChatJob((ChatMessage("user", "héllo"),), Sampling(max_tokens=3, stop=("x",)))
    big = Emitted(7, TextDelta("y" * 3_000_000))  # larger than one socket read
    thread = threading.Thread(target=lambda: (sender.send(Call(1, "chat", job)), sender.send(big)))
    thread.start()
    assert receiver.receive() == Call(1, "chat", job)
    assert receiver.receive() == big
    thread.join()
    ours.close()
    with pytest.raises(ChannelClosed):
        receiver.receive()


def test_a_broken_length_is_refused_not_allocated() -> None:
    with pytest.raises(ChannelClosed):
        decode_length(b"\xff\xff\xff\xff")
    assert decode_length(encode("x")[:4]) == len(pickle.dumps("x", protocol=pickle.HIGHEST_PROTOCOL))


@pytest.mark.parametrize(
    "error",
    [
        UnsupportedParameter("n", "llama-cpp", "one choice"),
        ContextLengthExceeded(5000, 4096, param="max_tokens"),
        ModelUnavailable("weights missing", retry_after=3),
    ],
)
def test_request_errors_cross_the_process_boundary_whole(error: Exception) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert copy.__dict__ == error.__dict__
    assert str(copy) == str(error)


def test_a_worker_line_is_one_escaped_clipped_log_line() -> None:
    forged = 'INFO lllmsd.access: 127.0.0.1 "POST /v1/chat" 200\n'
    level, text = process._classify(b'root ::= "a"\nINFO fake line\x1b[31m' + b"x" * 10_000 + b"\n")
    clipped = process._clip(text)
    assert "\n" not in clipped
    assert "\\n" in clipped
    assert "\x1b" not in clipped
    assert len(clipped) < process.LOG_LINE_LIMIT + 40
    assert level == logging.INFO
    assert process._classify(b"ERROR lllmsd.engines: the model broke\n") == (
        logging.ERROR,
        "lllmsd.engines: the model broke",
    )
    assert process._classify(forged.encode())[0] == logging.INFO  # a level word alone decides nothing else


def test_a_flood_of_worker_lines_is_cut_to_a_burst_per_window(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(process.time, "monotonic", lambda: now[0])
    limiter = process._LineLimiter()
    admitted = sum(limiter.admit() for _ in range(2_000_000 // 1000))  # a 2,000-line burst
    assert admitted == process.LOG_BURST
    assert limiter.dropped_now() is None  # reported once the window is over
    now[0] += process.LOG_WINDOW
    assert limiter.dropped_now() == 2000 - process.LOG_BURST
    assert limiter.admit()


class RecordingChannel:
    def __init__(self) -> None:
        self.sent: list[object] = []

    def send(self, message: object) -> None:
        self.sent.append(message)


def collected_frames(events: list[TextDelta], *, fail_after: bool = False) -> list[object]:
    from lllmsd.core.worker.main import Worker

    def generate() -> Iterator[TextDelta]:
        yield from events
        if fail_after:
            raise RuntimeError("the engine broke")

    channel = RecordingChannel()
    worker = Worker(channel)  # type: ignore[arg-type]
    with contextlib.suppress(RuntimeError):
        worker._send_events(5, generate(), threading.Event(), stream=False)
    return channel.sent


def test_a_collected_answer_goes_in_frames_of_many_events_in_order() -> None:
    from lllmsd.core.worker.main import COLLECTED_FRAME_EVENTS

    events = [TextDelta(str(i)) for i in range(2 * COLLECTED_FRAME_EVENTS + 3)]
    frames = collected_frames(events)
    assert [len(f.events) for f in frames] == [COLLECTED_FRAME_EVENTS, COLLECTED_FRAME_EVENTS, 3]  # type: ignore[attr-defined]
    assert all(isinstance(f, EmittedMany) and f.call_id == 5 for f in frames)
    assert [e for f in frames for e in f.events] == events  # type: ignore[attr-defined]


def test_a_collected_answer_that_fails_still_sends_what_came_before() -> None:
    frames = collected_frames([TextDelta("a"), TextDelta("b")], fail_after=True)
    assert frames == [EmittedMany(5, (TextDelta("a"), TextDelta("b")))]


def streamed_frames(timed: list[tuple[float, TextDelta]]) -> list[object]:
    from lllmsd.core.worker.main import Worker

    now = [0.0]

    def generate() -> Iterator[TextDelta]:
        for at, event in timed:
            now[0] = at
            yield event

    channel = RecordingChannel()
    worker = Worker(channel, clock=lambda: now[0])  # type: ignore[arg-type]
    worker._send_events(9, generate(), threading.Event(), stream=True)
    return channel.sent


def test_a_stream_sends_each_event_at_once_unless_one_went_within_the_window() -> None:
    from lllmsd.core.worker.main import STREAM_WINDOW

    a, b, c, d, e = (TextDelta(t) for t in "abcde")
    # a goes at once; b comes within the window and waits for c, which comes after it: both in one frame;
    # d and e each come more than a window after the frame before: each at once
    w = STREAM_WINDOW
    frames = streamed_frames([(0.0, a), (w / 2, b), (w * 1.1, c), (w * 2.5, d), (w * 4, e)])
    assert frames == [Emitted(9, a), EmittedMany(9, (b, c)), Emitted(9, d), Emitted(9, e)]


def test_a_stream_sends_what_waits_when_it_ends() -> None:
    from lllmsd.core.worker.main import STREAM_WINDOW

    a, b = TextDelta("a"), TextDelta("b")
    assert streamed_frames([(0.0, a), (STREAM_WINDOW / 4, b)]) == [Emitted(9, a), Emitted(9, b)]
