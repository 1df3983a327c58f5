"""Rounds: the steps of several sequences of one llama.cpp context, evaluated together.

An instance with ``slots: N`` serves up to N requests at once, each on a sequence of its own in one
context. Each step of each sequence (a chunk of its prompt, or the token it sampled last) is submitted
here, and one ``llama_decode`` evaluates the steps of every sequence in a round: the weights are read once
per round instead of once per sequence, which is where batching wins on a CPU.

The rule that makes it safe: a round runs only once every member (a sequence taking part) has submitted
its next step. A member samples from the logits of its last round, and those logits are valid only until
the next ``llama_decode``; since that decode waits for the member's next submission, the member has
finished sampling by then. A request becomes a member at its first submission and stays one until its
slot is given back (``leave``), so it must not wait on anything else between submissions.

Running ahead: between two rounds each member hands its token on (detokenized, checked for stop strings,
sent to the daemon) before it submits the next step, and on 2 cores the wake-ups and the GIL made that
about 2 ms of each 25 ms round for four members. So a step may let the decode thread start the member's
next step itself (``ahead``: how many more in a row): right after sampling, it queues a step that
evaluates the sampled token, and the next round need not wait for the member. The member then takes that
step's result (``follow``) instead of submitting; one that stops (a stop string, a cancel) waits for it
and keeps its token, which is the answer's own. Only a step whose member already waits for it
(``awaited``) is continued, so a member is never more than one step behind; no step is continued past an
end-of-generation token; and a member that reads its logits (logprobs) does not run ahead, since the next
round would overwrite them.

Who decodes: one thread of its own, always the same. ggml's CPU backend runs a decode on an OpenMP team
that belongs to the calling thread, and a team that just finished spins for a while before it sleeps; with
the decoding thread changing every round (the member that completed it), several teams lived at once, and
a four-token round on SmolLM2 took 64 ms against 51 ms from one thread, in one measurement on 2 cores.
Steps that do not fit in one batch (two prompts' chunks at once) stay queued in the order they came and go
first in the next round.

Concurrency: every public method may be called from any thread; ``_lock`` guards members, the queue and
``_closed``, and ``_work`` (on that lock) wakes the decode thread when a round may be ready. The decode runs
without the lock, on the decode thread only, so rounds never overlap. Each step has an event of its own
that wakes its one submitter, and a submission wakes only the decode thread, not every waiting member.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False, slots=True)
class Step:
    """One sequence's part of a round: ``tokens`` from ``position`` on; the decode sets ``index`` (where
    the last token's logits are in the round's output) or ``error``, and with a ``sampler`` (a llama.cpp
    sampler chain) the next token sampled from those logits, ``sampled``."""

    seq: int
    tokens: Sequence[int]
    position: int
    sampler: Any = None
    ahead: int = 0  # with a sampler: steps the decode thread may start after it by itself (module docstring)
    index: int = -1
    sampled: int = -1
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    awaited: bool = False  # its member waits for it (set under the rounds' lock)
    follow: Step | None = None  # the step the decode thread started after it, evaluating ``sampled``

    def result(self) -> Step:
        """This step once its round ran; raises what the round's decode raised."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self


# evaluates the steps as one batch; sets each step's index, and samples the steps that carry a sampler
DecodeRound = Callable[[list[Step]], None]


class Rounds:
    def __init__(
        self, decode: DecodeRound, batch_size: int, is_end: Callable[[int], bool] = lambda token: False
    ) -> None:
        """``is_end(token)``: whether a sampled token ends generation (no step is started after it)."""
        self._decode = decode
        self.batch_size = batch_size
        self._is_end = is_end
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._members: set[int] = set()
        self._queue: list[Step] = []
        self._closed = False
        # Sampling reads and writes state of the llama.cpp context: two threads must not sample at once.
        # Steps are sampled by the decode thread; a member samples itself only after a prompt (whose
        # logits came without a sampler), under this lock.
        self.sampling = threading.Lock()
        self.rounds_run = 0  # how many decodes ran (the batching is visible in tests)
        self._thread = threading.Thread(target=self._run, name="lllmsd-rounds", daemon=True)
        self._thread.start()

    def submit(self, seq: int, tokens: Sequence[int], position: int, sampler: Any = None, ahead: int = 0) -> Step:
        """Evaluate ``tokens`` (at most ``batch_size``) after ``position`` in sequence ``seq``, in the next
        round, and sample the next token by ``sampler`` if one is given (and start up to ``ahead`` steps
        after it: module docstring); blocks until it ran. Returns the step (its ``index`` and ``sampled``);
        raises what the decode raised. The caller becomes a member if it was not one."""
        if not 0 < len(tokens) <= self.batch_size:
            raise ValueError(f"a step takes 1 to {self.batch_size} tokens, not {len(tokens)}")
        step = Step(seq, tokens, position, sampler, ahead, awaited=True)  # its submitter waits for it now
        with self._lock:
            if self._closed:
                raise RuntimeError("the context is closed")
            self._members.add(seq)
            self._queue.append(step)
            if self._ready():
                self._work.notify()
        return step.result()

    def wait(self, step: Step) -> Step:
        """Wait for the round of ``step`` (a submitted step, or one the decode thread started: ``follow``);
        raises what its decode raised."""
        with self._lock:
            step.awaited = True
        return step.result()

    def leave(self, seq: int) -> None:
        """``seq`` takes no further part (its request ended); a round that waited only for it runs now."""
        with self._lock:
            self._members.discard(seq)
            if self._ready():
                self._work.notify()

    def close(self) -> None:
        """Stop the decode thread; steps still queued fail."""
        with self._lock:
            self._closed = True
            self._work.notify()
        self._thread.join()

    def _ready(self) -> bool:
        """Under the lock: whether every member has a step queued."""
        return bool(self._queue) and len({step.seq for step in self._queue}) >= len(self._members)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._ready():
                    self._work.wait()
                if self._closed:
                    batch, self._queue = self._queue, []
                    for step in batch:
                        step.error = RuntimeError("the context is closed")
                        step.done.set()
                    return
                batch = self._take_batch()
            try:
                self._decode(batch)
            except BaseException as exc:
                for step in batch:
                    step.error = exc
            else:
                self._run_ahead(batch)
            self.rounds_run += 1
            for step in batch:
                step.done.set()

    def _run_ahead(self, batch: list[Step]) -> None:
        """Queue the next step of each member that waits for its step of this round and lets it run ahead,
        before anyone is woken: the next round can start as soon as this one ends."""
        with self._lock:
            if self._closed:
                return
            for step in batch:
                if step.ahead > 0 and step.awaited and step.sampler is not None and not self._is_end(step.sampled):
                    position = step.position + len(step.tokens)
                    step.follow = Step(step.seq, (step.sampled,), position, step.sampler, step.ahead - 1)
                    self._queue.append(step.follow)

    def _take_batch(self) -> list[Step]:
        """Under the lock: the queued steps that fit in one batch, in the order they came."""
        batch, used = [], 0
        for step in self._queue:
            if used + len(step.tokens) > self.batch_size:
                break  # the rest keep their place for the next round
            batch.append(step)
            used += len(step.tokens)
        del self._queue[: len(batch)]
        return batch
