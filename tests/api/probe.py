"""An instrumented FakeEngine: counts instances and concurrent calls, holds calls at a gate, fails on cue.

Each test builds its own ``Probe`` and passes ``probe.engine_class()`` to the app as the "fake" engine,
so nothing is shared between tests.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from lllmsd.core.jobs import ChatJob, CompletionJob, GenerationEvent
from lllmsd.engines.fake import FakeEngine

GATE_LIMIT = 30.0  # a forgotten gate must not hang the test run


class Probe:
    def __init__(self, *, gated: bool = False, load_gated: bool = False) -> None:
        self.lock = threading.Lock()
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.load_gate = threading.Event()  # loads of models configured with a load_delay wait here
        if not load_gated:
            self.load_gate.set()
        self.created = 0
        self.closed = 0
        self.active = 0
        self.peak = 0
        self.seen: list[str] = []  # last user message of each call, in the order calls started
        self.events_after_cancel = 0

    def engine_class(self) -> type[FakeEngine]:
        probe = self

        class ProbedFake(FakeEngine):
            def __init__(self, config: Any, files: Any) -> None:
                if config.load_delay and not probe.load_gate.wait(GATE_LIMIT):
                    raise TimeoutError("probe load gate never opened")
                super().__init__(config, files)
                with probe.lock:
                    probe.created += 1

            def close(self) -> None:
                super().close()
                with probe.lock:
                    probe.closed += 1

            def chat(self, job: ChatJob, cancel: threading.Event) -> Iterator[GenerationEvent]:
                return probe.run(super().chat, job, cancel, job.messages[-1].content or "")

            def complete(self, job: CompletionJob, cancel: threading.Event) -> Iterator[GenerationEvent]:
                return probe.run(super().complete, job, cancel, job.prompt)

        return ProbedFake

    def run(
        self, method: Callable[..., Iterator[GenerationEvent]], job: Any, cancel: threading.Event, label: str
    ) -> Iterator[GenerationEvent]:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.seen.append(label)
        try:
            if not self.gate.wait(GATE_LIMIT):
                raise TimeoutError("probe gate never opened")
            if "explode" in label:
                raise RuntimeError("probe: exploding as asked")
            for event in method(job, cancel):
                if cancel.is_set():
                    with self.lock:
                        self.events_after_cancel += 1
                yield event
        finally:
            with self.lock:
                self.active -= 1


async def eventually(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    """Wait for something another asyncio task or thread makes true (not for a TTL: TTLs use the clock)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)
