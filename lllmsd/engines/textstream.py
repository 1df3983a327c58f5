"""Generated text as engines hand it out: UTF-8 decoded across token boundaries, cut before the first stop
sequence, and held back while its end could still grow into one, so a stop sequence never reaches the
client, not even in part. Shared by the engines that implement stop sequences themselves."""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import replace

from lllmsd.core.jobs import TokenLogprob


def partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that could still grow into a stop sequence."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class TextStream:
    """Token bytes in, releasable text (and the logprobs of the tokens it came from) out.

    Invariant: no stop sequence starts before ``sent``, because text that could begin one is never
    released early; so stop sequences are searched for from there on only.
    """

    def __init__(self, stops: Sequence[str], offset: int = 0) -> None:
        self.stops = tuple(s for s in stops if s)
        self.offset = offset  # text_offset of the first generated character (an echoed prompt's length)
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.text = ""
        self.sent = 0
        self.pending: list[tuple[int, TokenLogprob]] = []  # (start in text, logprob) not yet released
        self.stopped = False

    @property
    def emitted(self) -> str:
        """The text released so far."""
        return self.text[: self.sent]

    def feed(self, piece: bytes, logprob: TokenLogprob | None = None) -> None:
        start = len(self.text)
        if logprob is not None:
            self.pending.append((start, replace(logprob, text_offset=self.offset + start)))
        self._append(self.decoder.decode(piece))

    def release(self, hold_all: bool = False) -> tuple[str, tuple[TokenLogprob, ...]]:
        """What may be shown now (nothing while ``hold_all``: a caller still deciding what the text is)."""
        if hold_all:
            return "", ()
        end = len(self.text) if self.stopped else len(self.text) - partial_stop(self.text, self.stops)
        return self._take(end)

    def flush(self) -> tuple[str, tuple[TokenLogprob, ...]]:
        """Generation ended: the rest, including what was held back (it did not become a stop sequence)."""
        if not self.stopped:
            self._append(self.decoder.decode(b"", final=True))
        return self._take(len(self.text))

    def _append(self, text: str) -> None:
        if self.stopped:
            return
        self.text += text
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _take(self, end: int) -> tuple[str, tuple[TokenLogprob, ...]]:
        if end <= self.sent:
            return "", ()
        delta = self.text[self.sent : end]
        self.sent = end
        ready = tuple(lp for start, lp in self.pending if start < end)
        self.pending = [(start, lp) for start, lp in self.pending if start >= end]
        return delta, ready
