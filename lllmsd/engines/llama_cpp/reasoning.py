"""Splitting a thinking model's reasoning (``<think>...</think>``) from its answer, while it streams.

Families that think in ``<think>`` tags (Qwen 3, DeepSeek-R1 distills, SmolLM3, ...) write their reasoning
first, between the tags; some templates open the tag in the prompt already (the answer then starts
inside the reasoning, and only ``</think>`` shows in the output). Only a ``<think>`` at the very start of
the answer opens reasoning: the tag later in an answer is text. Partial tags are held back, so neither tag
ever reaches the client. The whitespace a model writes right after ``</think>`` is dropped.

Pure logic, fed decoded text; with the config's ``reasoning: inline`` the engine does not use it and the
tags stay in the content.
"""

from __future__ import annotations

from lllmsd.engines.textstream import partial_stop

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ReasoningSplit:
    """Text in; (reasoning, content) out, each what may be released now."""

    def __init__(self, *, inside: bool = False) -> None:
        # before: may still open; thinking: inside the tags; answer: after them (or no reasoning at all)
        self._state = "thinking" if inside else "before"
        self._buffer = ""

    def feed(self, text: str) -> tuple[str, str]:
        self._buffer += text
        reasoning = content = ""
        while True:
            if self._state == "before":
                head = self._buffer.lstrip()
                if head.startswith(THINK_OPEN):
                    self._buffer = head[len(THINK_OPEN) :]
                    self._state = "thinking"
                    continue
                if THINK_OPEN.startswith(head):
                    return reasoning, content  # could still be the tag (or only whitespace so far)
                self._state = "answer"
                continue
            if self._state == "thinking":
                end = self._buffer.find(THINK_CLOSE)
                if end >= 0:
                    reasoning += self._buffer[:end]
                    self._buffer = self._buffer[end + len(THINK_CLOSE) :]
                    self._state = "after"
                    continue
                keep = partial_stop(self._buffer, (THINK_CLOSE,))
                reasoning += self._buffer[: len(self._buffer) - keep]
                self._buffer = self._buffer[len(self._buffer) - keep :]
                return reasoning, content
            if self._state == "after":
                self._buffer = self._buffer.lstrip()
                if not self._buffer:
                    return reasoning, content
                self._state = "answer"
            content += self._buffer
            self._buffer = ""
            return reasoning, content

    def flush(self) -> tuple[str, str]:
        """The end of the answer: what was held back. A reasoning that never closed stays reasoning."""
        rest, self._buffer = self._buffer, ""
        if self._state == "thinking":
            return rest, ""
        if self._state == "after":
            return "", ""
        return "", rest
