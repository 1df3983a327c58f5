"""An instance's slots: the decoders of its sequences, and which request holds each.

With ``slots: 1`` (the default) an instance has one decoder on a context of its own, and the pool hands it
to one request at a time. With ``slots: N`` the context holds N sequences (model.py: ``share_context``),
each with a decoder of its own, and the pool hands the instance to up to N requests at once. Each takes a
free slot for the whole of its job and gives it back at the end, when rounds (rounds.py) stop waiting for
it. Which free slot: the one where the prompt's shared prefix saves the most against what it throws away,
``shared - 2 x (held - shared)`` tokens, the least recently used among equals. A conversation's next turn
so finds its own slot (it shares nearly all the slot holds, even when the answer's last tokens were
rendered differently), and a new conversation that shares only a system prompt with a slot's takes an
empty slot rather than evict that conversation: evicting it costs the other conversation a full prompt
evaluation when it comes back, which is why what is thrown away counts double.

Concurrency: ``take`` may be called from any thread (the worker runs each call of such an engine on a
thread of its own); ``_lock`` guards the free list. A slot is used by the one thread that took it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import llama_cpp

from lllmsd.engines.llama_cpp.context import SequenceContext, SharedBatch
from lllmsd.engines.llama_cpp.rounds import Rounds
from lllmsd.engines.llama_cpp.sampling import Decoder
from lllmsd.errors import EngineError


class Slots:
    def __init__(self, llama: llama_cpp.Llama, count: int, shown_markers: tuple[str, ...]) -> None:
        """``count`` decoders on ``llama``'s context: one on a context of its own, or one per sequence of a
        context that ``share_context`` (model.py) gave ``count`` sequences, their steps in shared rounds."""
        self._batch: SharedBatch | None = None
        self.rounds: Rounds | None = None  # None with one slot
        if count == 1:
            decoders = [Decoder(llama, shown_markers)]
        else:
            self._batch = SharedBatch(llama, llama.n_batch)
            vocab = llama._model.vocab
            self.rounds = Rounds(
                self._batch.decode, llama.n_batch, lambda token: llama_cpp.llama_vocab_is_eog(vocab, token)
            )
            size = llama_cpp.llama_n_ctx_seq(llama.ctx)
            decoders = [
                Decoder(llama, shown_markers, SequenceContext(llama, seq, size, self.rounds)) for seq in range(count)
            ]
        self.decoders = tuple(decoders)
        self._free = list(decoders)
        self._lock = threading.Lock()
        self._used: dict[int, int] = {id(d): 0 for d in decoders}  # when each was last taken (a counter)
        self._takes = 0

    @property
    def count(self) -> int:
        return len(self.decoders)

    def close(self) -> None:
        """Stop the rounds' decode thread and free the shared batch (before the context goes)."""
        if self.rounds is not None:
            self.rounds.close()
            self.rounds = None
        if self._batch is not None:
            self._batch.close()
            self._batch = None

    @contextlib.contextmanager
    def take(self, prompt: list[int]) -> Iterator[Decoder]:
        """A free slot for one job, chosen as the module's docstring says, given back when the job ends."""
        with self._lock:
            if not self._free:  # the pool hands an instance to at most ``slots`` requests
                raise EngineError(f"all {self.count} slots of this instance are taken")
            decoder = max(self._free, key=lambda d: self._preference(d, prompt))
            self._free.remove(decoder)
            self._takes += 1
            self._used[id(decoder)] = self._takes
        try:
            yield decoder
        finally:
            decoder.leave()
            with self._lock:
                self._free.append(decoder)

    def _preference(self, decoder: Decoder, prompt: list[int]) -> tuple[int, int]:
        """Higher is better: (tokens saved less twice those thrown away, the least recently used)."""
        shared = decoder.common_prefix(prompt)
        thrown_away = decoder.held_tokens - shared
        return shared - 2 * thrown_away, -self._used[id(decoder)]
