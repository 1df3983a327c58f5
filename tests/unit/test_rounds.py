"""Rounds (engines/llama_cpp/rounds.py): the steps of several sequences go into one decode, a round runs
only once every member has submitted, and what a decode raises reaches each of its submitters.

The decode here records the batches it is given instead of running llama.cpp: what is tested is the
scheduling, which does not depend on what the decode computes (the real decode is tested on SmolLM2 by
the text contract suite's llama-cpp-slots subject and tests/engines/test_llama_slots.py)."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from lllmsd.engines.llama_cpp.rounds import Rounds, Step

WAIT = 10.0  # seconds a test waits for a thread before it fails (never reached when the code is right)


class Recorder:
    def __init__(self, fail_with: BaseException | None = None) -> None:
        self.batches: list[list[tuple[int, tuple[int, ...], int]]] = []
        self.fail_with = fail_with
        self.lock = threading.Lock()

    def __call__(self, steps: list[Step]) -> None:
        with self.lock:
            self.batches.append([(s.seq, tuple(s.tokens), s.position) for s in steps])
        if self.fail_with is not None:
            raise self.fail_with
        offset = 0
        for step in steps:
            offset += len(step.tokens)
            step.index = offset - 1
            if step.sampler is not None:
                step.sampled = step.sampler(step)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def rounds(recorder: Recorder) -> Iterator[Rounds]:
    made = Rounds(recorder, batch_size=8)
    yield made
    made.close()


def in_thread(target, *args) -> tuple[threading.Thread, list]:  # type: ignore[no-untyped-def]
    out: list = []

    def run() -> None:
        try:
            out.append(target(*args))
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_a_lone_member_runs_at_once(rounds: Rounds, recorder: Recorder) -> None:
    step = rounds.submit(0, [5, 6, 7], 0)
    assert recorder.batches == [[(0, (5, 6, 7), 0)]]
    assert step.index == 2


def test_steps_of_all_members_share_one_decode(rounds: Rounds, recorder: Recorder) -> None:
    first, _ = in_thread(rounds.submit, 0, [1, 2], 0)
    first.join(WAIT)
    second, _ = in_thread(rounds.submit, 1, [3], 0)  # seq 0 is a member with no step queued: seq 1 waits
    second.join(0.2)
    assert second.is_alive()
    assert recorder.batches == [[(0, (1, 2), 0)]]
    third, result = in_thread(rounds.submit, 0, [4], 2)  # now every member has a step: one round for both
    second.join(WAIT)
    third.join(WAIT)
    assert recorder.batches[-1] == [(1, (3,), 0), (0, (4,), 2)]
    assert result[0].index == 1  # seq 0's token is the second of the batch


def test_leaving_releases_a_round_that_waited_for_the_leaver(rounds: Rounds, recorder: Recorder) -> None:
    rounds.submit(0, [1], 0)
    waiting, result = in_thread(rounds.submit, 1, [2], 0)
    waiting.join(0.2)
    assert waiting.is_alive()
    rounds.leave(0)
    waiting.join(WAIT)
    assert not waiting.is_alive()
    assert recorder.batches[-1] == [(1, (2,), 0)]
    assert isinstance(result[0], Step)


def test_steps_that_do_not_fit_keep_their_place_for_the_next_round(rounds: Rounds, recorder: Recorder) -> None:
    rounds.submit(0, [1], 0)
    big, _ = in_thread(rounds.submit, 1, list(range(8)), 0)  # 8 tokens, the whole batch: waits for seq 0
    big.join(0.2)
    small, _ = in_thread(rounds.submit, 0, [9], 1)
    big.join(WAIT)
    # seq 1's chunk came first and fills the batch; seq 0's token stays queued, first in the next round
    assert recorder.batches[-1] == [(1, tuple(range(8)), 0)]
    assert small.is_alive()
    rounds.submit(1, [5], 8)
    small.join(WAIT)
    assert recorder.batches[-1] == [(0, (9,), 1), (1, (5,), 8)]


def test_the_decode_thread_samples_steps_that_carry_a_sampler(rounds: Rounds) -> None:
    step = rounds.submit(0, [3, 4], 0, sampler=lambda s: 100 + s.index)
    assert step.sampled == 101


def test_a_failed_decode_reaches_every_step_of_its_round_and_rounds_go_on() -> None:
    recorder = Recorder()
    rounds = Rounds(recorder, batch_size=8)
    try:
        rounds.submit(0, [1], 0)
        recorder.fail_with = RuntimeError("no room")
        other, result = in_thread(rounds.submit, 1, [2], 0)
        other.join(0.2)
        with pytest.raises(RuntimeError, match="no room"):
            rounds.submit(0, [3], 1)  # completes the round with seq 1's step: both fail
        other.join(WAIT)
        assert isinstance(result[0], RuntimeError)
        assert recorder.batches[-1] == [(1, (2,), 0), (0, (3,), 1)]
        recorder.fail_with = None
        rounds.leave(1)
        assert rounds.submit(0, [3], 1).index == 0
    finally:
        rounds.close()


def test_a_step_larger_than_the_batch_is_refused(rounds: Rounds) -> None:
    with pytest.raises(ValueError, match="1 to 8 tokens"):
        rounds.submit(0, list(range(9)), 0)


def test_closing_fails_the_steps_still_waiting(recorder: Recorder) -> None:
    rounds = Rounds(recorder, batch_size=8)
    rounds.submit(0, [1], 0)
    waiting, result = in_thread(rounds.submit, 1, [2], 0)  # waits for seq 0, which never comes
    waiting.join(0.2)
    rounds.close()
    waiting.join(WAIT)
    assert isinstance(result[0], RuntimeError)
    with pytest.raises(RuntimeError, match="closed"):
        rounds.submit(2, [3], 0)


# ------------------------------------------------------------------------------------------ running ahead


class GatedRecorder(Recorder):
    """Each decode waits for the test to allow it: the test decides what the member has done by then."""

    def __init__(self) -> None:
        super().__init__()
        self.allowed = threading.Semaphore(0)

    def __call__(self, steps: list[Step]) -> None:
        assert self.allowed.acquire(timeout=WAIT)
        super().__call__(steps)


def until(condition: Callable[[], bool]) -> None:
    """Wait for another thread to get somewhere (polls; fails after WAIT)."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def counting_sampler(start: int) -> Callable[[Step], int]:
    tokens = itertools.count(start)
    return lambda step: next(tokens)


def test_the_decode_thread_starts_the_next_steps_of_a_member_that_waits() -> None:
    recorder = GatedRecorder()
    rounds = Rounds(recorder, batch_size=8)
    try:
        taken: list[Step] = []

        def member() -> None:
            step = rounds.submit(0, [1, 2], 0, counting_sampler(100), ahead=2)
            taken.append(step)
            while step.follow is not None:  # what the decode thread started: the member submits nothing
                step = rounds.wait(step.follow)
                taken.append(step)

        thread, result = in_thread(member)
        recorder.allowed.release()  # the first decode: the step submitted, which its member waits for
        for decodes in (1, 2):  # each next one once the member waits for the step started for it
            until(lambda: len(taken) == decodes)  # noqa: B023 - called before the loop moves on
            until(lambda: taken[-1].follow is not None and taken[-1].follow.awaited)
            recorder.allowed.release()
        thread.join(WAIT)
        assert result == [None]  # no error
        # each step evaluates the token the one before sampled, at the next position; `ahead` ran out at 2
        assert recorder.batches == [[(0, (1, 2), 0)], [(0, (100,), 2)], [(0, (101,), 3)]]
        assert [step.sampled for step in taken] == [100, 101, 102]
        assert taken[-1].follow is None
    finally:
        recorder.allowed.release(8)
        rounds.close()


def test_no_step_is_started_after_an_end_token(recorder: Recorder) -> None:
    rounds = Rounds(recorder, batch_size=8, is_end=lambda token: token == 100)
    try:
        step = rounds.submit(0, [1], 0, counting_sampler(100), ahead=5)
        assert (step.sampled, step.follow) == (100, None)
        assert rounds.submit(0, [2], 1, counting_sampler(200), ahead=5).follow is not None
    finally:
        rounds.close()


def test_a_member_is_never_more_than_one_step_behind(rounds: Rounds, recorder: Recorder) -> None:
    step = rounds.submit(0, [1], 0, counting_sampler(100), ahead=5)
    assert step.follow is not None
    assert step.follow.done.wait(WAIT)  # it ran while the member did not wait for it
    assert step.follow.follow is None  # so nothing was started after it: the member catches up first
    assert recorder.batches == [[(0, (1,), 0)], [(0, (100,), 1)]]
    assert rounds.submit(0, [101], 2).index == 0  # and the member goes on by submitting
