"""What one instance's llama.cpp context holds, driven through llama-cpp-python's low-level API.

The text engine owns its context's contents: which tokens it holds (for KV prefix reuse) and the batches
that feed it. ``Llama.eval`` (the high-level object's loop) is not used for generation: per token it
removes the KV tail, refills a 1-token batch field by field through ctypes and copies the token into its
own array. Here one step is one ``llama_decode`` of a batch made once (``llama_batch_get_one`` over a
1-token array: llama.cpp places it after what the sequence holds and computes logits for it alone).

Concurrency: an instance runs one job at a time (the pool's rule); nothing here is thread-safe.
"""

from __future__ import annotations

import ctypes
import threading

import llama_cpp
import numpy as np

# llama_decode's return codes (llama.h): 1 = no room in the KV cache for the batch, 2 = aborted.
DECODE_NO_ROOM = 1


class DecodeFailed(RuntimeError):
    """llama_decode refused a batch; the context holds what it held before it."""


class Context:
    """The tokens one llama.cpp context holds (sequence 0), and how to add to them."""

    def __init__(self, llama: llama_cpp.Llama) -> None:
        self._ctx = llama.ctx
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self.size = llama.n_ctx()
        self.batch_size = llama.n_batch
        self._held = np.zeros(self.size, dtype=np.intc)
        self.held = 0  # how many tokens of _held the KV cache holds, from position 0
        self._chunk = (llama_cpp.llama_token * self.batch_size)()
        self._one = (llama_cpp.llama_token * 1)()
        # Made once: its token pointer is _one's, so one step only writes the token and decodes.
        self._one_batch = llama_cpp.llama_batch_get_one(self._one, 1)

    def common_prefix(self, tokens: list[int]) -> int:
        """How many leading ``tokens`` the context already holds."""
        count = min(self.held, len(tokens))
        if not count:
            return 0
        differ = np.flatnonzero(self._held[:count] != np.asarray(tokens[:count], dtype=np.intc))
        return int(differ[0]) if differ.size else count

    def truncate(self, keep: int) -> None:
        """Keep the first ``keep`` tokens; a memory that cannot drop a suffix (recurrent models) is
        cleared instead."""
        if keep >= self.held:
            return
        if not llama_cpp.llama_memory_seq_rm(self._memory, -1, keep, -1):
            llama_cpp.llama_memory_clear(self._memory, True)
            keep = 0
        self.held = keep

    def feed(self, tokens: list[int], cancel: threading.Event | None) -> bool:
        """Evaluate ``tokens`` after what the context holds, a batch at a time; False if cancelled between
        batches (what was evaluated stays held)."""
        for start in range(0, len(tokens), self.batch_size):
            if cancel is not None and cancel.is_set():
                return False
            part = tokens[start : start + self.batch_size]
            self._chunk[: len(part)] = part
            self._decode(llama_cpp.llama_batch_get_one(self._chunk, len(part)), len(part))
            self._held[self.held : self.held + len(part)] = part
            self.held += len(part)
        return True

    def step(self, token: int) -> None:
        """Evaluate one token after what the context holds: one llama_decode."""
        self._one[0] = token
        self._decode(self._one_batch, 1)
        self._held[self.held] = token
        self.held += 1

    def logits(self, n_vocab: int) -> np.ndarray:
        """The last evaluated position's logits (a view into llama.cpp's buffer, valid until the next
        decode)."""
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, -1), shape=(n_vocab,))

    def sample(self, sampler: ctypes.c_void_p) -> int:
        """The next token by ``sampler``'s chain, in C, from the last position's logits (the chain
        accepts it)."""
        return llama_cpp.llama_sampler_sample(sampler, self._ctx, -1)

    def _decode(self, batch: llama_cpp.llama_batch, count: int) -> None:
        if self.held + count > self.size:
            raise DecodeFailed(f"the context of {self.size} tokens is full")
        code = llama_cpp.llama_decode(self._ctx, batch)
        if code != 0:
            # The batch was not (wholly) evaluated: forget whatever llama.cpp may have kept of it.
            llama_cpp.llama_memory_seq_rm(self._memory, -1, self.held, -1)
            reason = "no room in the KV cache" if code == DECODE_NO_ROOM else f"code {code}"
            raise DecodeFailed(f"llama_decode failed: {reason}")
