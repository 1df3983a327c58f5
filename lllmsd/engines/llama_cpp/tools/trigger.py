"""Watching free text (tool_choice ``auto``) for the start of a call in the family's syntax.

Text that could still be the start of a trigger is held back, so a client never sees the first
characters of a call as content. A family whose calls may follow text (``anywhere``: Hermes, Mistral)
is watched all along; one whose calls must start the answer (Llama 3) only until its first
non-whitespace text shows it is not a call. Llama 3's JSON trigger is matched without whitespace
(``{ "name"`` starts a call too).
"""

from __future__ import annotations

from lllmsd.engines.llama_cpp.tools.syntax import CallSyntax
from lllmsd.engines.textstream import partial_stop


def _squeeze(text: str) -> str:
    return "".join(text.split())


class TriggerWatch:
    """Content text in; what may be shown, and whether (and where) a call started."""

    def __init__(self, syntax: CallSyntax) -> None:
        self.syntax = syntax
        self.text = ""
        self.sent = 0
        self.call_start: int | None = None  # where the call section starts in ``text``, once triggered
        self._watching = True

    def feed(self, text: str) -> str:
        """Add content; return what can be released as content now."""
        if self.call_start is not None:
            return ""
        self.text += text
        if not self._watching:
            return self._take(len(self.text))
        if self.syntax.anywhere:
            hits = [i for i in (self.text.find(t, self.sent) for t in self.syntax.triggers) if i >= 0]
            if hits:
                self.call_start = min(hits)
                return self._take(self.call_start)
            return self._take(len(self.text) - partial_stop(self.text, self.syntax.triggers))
        head = self.text.lstrip()
        squeezed = _squeeze(head)
        if any(squeezed.startswith(t) for t in self.syntax.triggers):
            self.call_start = 0  # the whitespace before is the call's (the parser skips it), not content
            return ""
        if any(t.startswith(squeezed) for t in self.syntax.triggers):
            return ""  # could still be a call
        self._watching = False
        return self._take(len(self.text))

    def flush(self) -> str:
        """Generation ended without a call: the rest is content."""
        if self.call_start is not None:
            return ""
        return self._take(len(self.text))

    @property
    def before(self) -> str:
        """The content before the call."""
        return self.text[: self.call_start] if self.call_start is not None else self.text

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out = self.text[self.sent : end]
        self.sent = end
        return out
