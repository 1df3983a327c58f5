"""Engines that misbehave in the ways a worker process must survive: importable by name, so the daemon
can run them in worker processes (``isolation: process``) like a real engine."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from lllmsd.core.jobs import ChatJob, EmbeddingJob, EmbeddingResult, GenerationEvent, TextDelta
from lllmsd.engines.fake import FakeEngine

STUCK_SECONDS = 3600.0  # far longer than any test: only a kill ends it


class StuckEngine(FakeEngine):
    """Answers one token, then hangs in a call that never looks at ``cancel`` (a stuck C call)."""

    isolation = "process"

    def chat(self, job: ChatJob, cancel: threading.Event) -> Iterator[GenerationEvent]:
        yield TextDelta("stuck")
        time.sleep(STUCK_SECONDS)

    def embed(self, job: EmbeddingJob) -> EmbeddingResult:
        time.sleep(STUCK_SECONDS)
        return super().embed(job)
