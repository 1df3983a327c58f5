"""What one instance's llama.cpp context holds, driven through llama-cpp-python's low-level API.

The text engine owns its context's contents: which tokens it holds (for KV prefix reuse) and the batches
that feed it. ``Llama.eval`` (the high-level object's loop) is not used for generation: per token it
removes the KV tail, refills a 1-token batch field by field through ctypes and copies the token into its
own array. Here one step is one ``llama_decode`` of a batch made once (``llama_batch_get_one`` over a
1-token array: llama.cpp places it after what the sequence holds and computes logits for it alone).

An instance with ``slots: N`` (N > 1) holds N sequences in one context, each a ``SequenceContext``
driven by one request at a time; their steps go through ``Rounds`` (rounds.py), which evaluates the steps
of all of them in one ``llama_decode``.

Concurrency: a ``Context`` serves one job at a time (the pool's rule for an instance of one slot), a
``SequenceContext`` one job at a time (the engine's slot picker's rule); neither is thread-safe itself.
"""

from __future__ import annotations

import ctypes
import threading

import llama_cpp
import numpy as np

from lllmsd.engines.llama_cpp.rounds import Rounds, Step

# llama_decode's return codes (llama.h): 1 = no room in the KV cache for the batch, 2 = aborted.
DECODE_NO_ROOM = 1


class DecodeFailed(RuntimeError):
    """llama_decode refused a batch; the context holds what it held before it."""

    @classmethod
    def from_code(cls, code: int) -> DecodeFailed:
        reason = "no room in the KV cache" if code == DECODE_NO_ROOM else f"code {code}"
        return cls(f"llama_decode failed: {reason}")


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

    def step_and_sample(self, token: int, sampler: ctypes.c_void_p) -> int:
        """Evaluate ``token``, then sample the next one by ``sampler``."""
        self.step(token)
        return self.sample(sampler)

    def next_sampled(self, token: int, sampler: ctypes.c_void_p, ahead: int) -> int:
        """``step_and_sample``, where up to ``ahead`` further tokens will be asked for the same way, without
        reading logits in between: a context that can evaluate them ahead may (a sequence of a shared one:
        rounds.py). A context of its own evaluates on the caller's thread, one step per call."""
        return self.step_and_sample(token, sampler)

    def settle(self) -> None:
        """The caller asks for no more tokens: wait for any step evaluated ahead (none here)."""

    def logits(self, n_vocab: int) -> np.ndarray:
        """The last evaluated position's logits (a view into llama.cpp's buffer, valid until the next
        decode)."""
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, -1), shape=(n_vocab,))

    def sample(self, sampler: ctypes.c_void_p) -> int:
        """The next token by ``sampler``'s chain, in C, from the last position's logits (the chain
        accepts it)."""
        return llama_cpp.llama_sampler_sample(sampler, self._ctx, -1)

    def leave(self) -> None:
        """The job on this context ended (a context of its own waits for nobody: nothing to do)."""

    def _check_room(self, count: int) -> None:
        if self.held + count > self.size:
            raise DecodeFailed(f"the context of {self.size} tokens is full")

    def _decode(self, batch: llama_cpp.llama_batch, count: int) -> None:
        self._check_room(count)
        code = llama_cpp.llama_decode(self._ctx, batch)
        if code != 0:
            # The batch was not (wholly) evaluated: forget whatever llama.cpp may have kept of it.
            llama_cpp.llama_memory_seq_rm(self._memory, -1, self.held, -1)
            raise DecodeFailed.from_code(code)


class SequenceContext(Context):
    """Sequence ``seq`` of a context shared by several slots: the same operations as ``Context``, each
    step evaluated in a round with the other sequences' steps (rounds.py)."""

    def __init__(self, llama: llama_cpp.Llama, seq: int, size: int, rounds: Rounds) -> None:
        self._ctx = llama.ctx
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self.seq = seq
        self.size = size  # this sequence's share of the context
        # a prompt chunk leaves room in the batch for every other slot's token of the same round
        self.batch_size = max(1, rounds.batch_size - (llama_cpp.llama_n_seq_max(self._ctx) - 1))
        self._rounds = rounds
        self._held = np.zeros(self.size, dtype=np.intc)
        self.held = 0
        self._index = -1  # where this sequence's last logits are in its last round's output
        self._last: Step | None = None  # the last step whose result was taken: its ``follow`` comes next

    def common_prefix(self, tokens: list[int]) -> int:
        self.settle()
        return super().common_prefix(tokens)

    def truncate(self, keep: int) -> None:
        self.settle()
        if keep >= self.held:
            return
        if not llama_cpp.llama_memory_seq_rm(self._memory, self.seq, keep, -1):
            llama_cpp.llama_memory_seq_rm(self._memory, self.seq, -1, -1)
            keep = 0
        self.held = keep

    def feed(self, tokens: list[int], cancel: threading.Event | None) -> bool:
        for start in range(0, len(tokens), self.batch_size):
            if cancel is not None and cancel.is_set():
                return False
            self._submit(tokens[start : start + self.batch_size])
        return True

    def step(self, token: int) -> None:
        self._submit([token])

    def step_and_sample(self, token: int, sampler: ctypes.c_void_p) -> int:
        # sampled by the decode thread as soon as the round is evaluated (rounds.py)
        return self._submit([token], sampler).sampled

    def next_sampled(self, token: int, sampler: ctypes.c_void_p, ahead: int) -> int:
        follow = self._take_follow()
        if follow is None:  # nothing started ahead: submit it, letting the decode thread run ahead after it
            room = self.size - self.held - 1
            return self._submit([token], sampler, max(0, min(ahead, room))).sampled
        return self._took(self._rounds.wait(follow)).sampled  # it evaluates ``token``, sampled last

    def settle(self) -> None:
        """Wait for a step the decode thread started ahead that nobody will take (the answer ended); its
        token is the answer's and stays held. Raises nothing: nobody asked for that step."""
        follow = self._take_follow()
        if follow is not None:
            follow.done.wait()  # not awaited: the decode thread starts nothing after it
            if follow.error is None:  # a failed decode forgot it: held stays as it was
                self._took(follow)

    def _take_follow(self) -> Step | None:
        """The step the decode thread started after the last one taken, if any (it can be taken once)."""
        last, self._last = self._last, None
        return last.follow if last is not None else None

    def leave(self) -> None:
        """The request on this sequence ended: rounds no longer wait for it."""
        self.settle()
        self._rounds.leave(self.seq)

    def logits(self, n_vocab: int) -> np.ndarray:
        with self._rounds.sampling:  # no member samples (which may touch the output) while the pointer is taken
            pointer = llama_cpp.llama_get_logits_ith(self._ctx, self._index)
        return np.ctypeslib.as_array(pointer, shape=(n_vocab,))

    def sample(self, sampler: ctypes.c_void_p) -> int:
        with self._rounds.sampling:  # another member may be sampling after its own prompt
            return llama_cpp.llama_sampler_sample(sampler, self._ctx, self._index)

    def _submit(self, tokens: list[int], sampler: ctypes.c_void_p | None = None, ahead: int = 0) -> Step:
        self.settle()
        self._check_room(len(tokens))
        return self._took(self._rounds.submit(self.seq, tokens, self.held, sampler, ahead))

    def _took(self, step: Step) -> Step:
        """Count a step's tokens as held; its logits are the last ones."""
        self._index = step.index
        self._held[self.held : self.held + len(step.tokens)] = step.tokens
        self.held += len(step.tokens)
        self._last = step
        return step


class SharedBatch:
    """The batch a round is evaluated in (``Rounds``' decode): every step's tokens at their positions in
    their sequences, logits for each step's last token."""

    def __init__(self, llama: llama_cpp.Llama, batch_size: int) -> None:
        self._ctx = llama.ctx
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(batch_size, 0, 1)

    def decode(self, steps: list[Step]) -> None:
        batch = self._batch
        count = 0
        # In ascending sequence order: with a KV cache per sequence, llama.cpp evaluates a batch in
        # sub-batches of consecutive sequence ids taken in the order they come (llama_batch_allocr::
        # split_equal), so the steps in arrival order, [2, 0, 3, 1] say, would cost two graph evaluations
        # instead of one, and [3, 2, 1, 0] four.
        for step in sorted(steps, key=lambda step: step.seq):
            last = len(step.tokens) - 1
            for offset, token in enumerate(step.tokens):
                batch.token[count] = token
                batch.pos[count] = step.position + offset
                batch.n_seq_id[count] = 1
                batch.seq_id[count][0] = step.seq
                batch.logits[count] = offset == last
                count += 1
            step.index = count - 1  # llama_get_logits_ith takes the token's place in the batch
        batch.n_tokens = count
        code = llama_cpp.llama_decode(self._ctx, batch)
        if code != 0:
            for step in steps:  # forget whatever llama.cpp may have kept of the round
                llama_cpp.llama_memory_seq_rm(self._memory, step.seq, step.position, -1)
            raise DecodeFailed.from_code(code)
        # The first read of a round's logits puts llama.cpp's output rows back in batch order (it reorders
        # them lazily, in place, after a batch it split by sequence): done here, on the decode thread,
        # before anyone is woken, so the members' reads afterwards only read.
        llama_cpp.llama_get_logits_ith(self._ctx, steps[-1].index)
        for step in steps:  # sampled here too, before anyone is woken: no lock needed
            if step.sampler is not None:
                step.sampled = llama_cpp.llama_sampler_sample(step.sampler, self._ctx, step.index)

    def close(self) -> None:
        llama_cpp.llama_batch_free(self._batch)
