"""A speech engine for streaming tests, importable by name so it can run in a worker process too."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lllmsd.core.jobs import SpeechJob
from lllmsd.engines.fake import FakeEngine

GATE_ENV = "LLLMSD_TEST_SPEECH_GATE"


class GatedSpeechEngine(FakeEngine):
    """Speaks the first sentence at once, then synthesizes nothing more until the file named by
    $LLLMSD_TEST_SPEECH_GATE exists: a test can hold the rest of the text back until it has heard the
    first sentence, which proves the first sentence left before the rest was synthesized."""

    def synthesize(self, job: SpeechJob, cancel: threading.Event) -> Iterator[np.ndarray]:
        gate = Path(os.environ[GATE_ENV])
        sentences = super().synthesize(job, cancel)
        first = next(sentences, None)
        if first is None:
            return
        yield first
        while not gate.exists():
            if cancel.wait(0.01):
                return
        yield from sentences
