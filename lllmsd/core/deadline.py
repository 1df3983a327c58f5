"""A request's time budget for engine work (the model's ``max_request_seconds``), as the hosts see it.

Text engines end generation themselves once ``Sampling.deadline`` passes (finish_reason "length"). The
host enforces the budget too, for what cannot end early (an embedding batch, a transcription) and for an
engine stuck where it cannot look at the clock (a grammar build, a huge prompt): at ``at`` (monotonic
seconds) the host's answer queue receives ``TIME_UP``, the host cancels the call (a worker that does not
stop within its grace is killed) and raises ``error()``. Arming costs one timer per call, nothing per
token.

Concurrency rule: armed and fired on the event loop thread.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from lllmsd.errors import TimeBudgetExceeded


class _TimeUp:
    def __repr__(self) -> str:
        return "TIME_UP"


TIME_UP = _TimeUp()


@dataclass(frozen=True, slots=True)
class Deadline:
    at: float  # time.monotonic() value
    seconds: float  # the budget it came from, for the message
    model_id: str

    @classmethod
    def after(cls, seconds: float, model_id: str) -> Deadline:
        return cls(time.monotonic() + seconds, seconds, model_id)

    def later(self, seconds: float) -> Deadline:
        """The same budget, enforced ``seconds`` later (text engines get to end on their own first)."""
        return Deadline(self.at + seconds, self.seconds, self.model_id)

    def arm(self, answers: asyncio.Queue[object]) -> Callable[[], None]:
        """Put TIME_UP into ``answers`` at the deadline; returns the function that disarms it."""
        if math.isinf(self.at):
            return _nothing
        loop = asyncio.get_running_loop()
        handle = loop.call_at(loop.time() + max(0.0, self.at - time.monotonic()), answers.put_nowait, TIME_UP)
        return handle.cancel

    def error(self) -> TimeBudgetExceeded:
        return TimeBudgetExceeded(
            f"the request's engine work on '{self.model_id}' took longer than {self.seconds:g}s (max_request_seconds)"
        )


def _nothing() -> None:
    pass


NO_DEADLINE = Deadline(math.inf, math.inf, "")
