"""One answer's tool calls as they are generated: which to stream, which to drop, when to stop, and how
the answer ends.

Rules (the issue's "calls end where the model ends them"):
- An exact repeat of a call already made in the same answer is never returned, and ends the answer:
  small models, offered another call by the grammar, repeat the one they just made.
- A call is streamed only once it cannot be such a repeat: while its name and arguments so far could
  still become an earlier call, it is held back (so a repeat never reaches a client, not even in part).
  Its first fragment carries the id and the name, then the arguments follow in fragments.
- A complete call followed by the end of the answer is finish_reason ``tool_calls``, even when what came
  after it (whitespace, the start of a repeat) met max_tokens.
- A call cut off by max_tokens is not a call: the answer ends with ``length`` and, where it was not
  streamed already, its text is returned as content. So is output that does not parse as the family's
  syntax, or that names a function the request did not offer: content, finish ``stop`` / ``length``,
  and a log line, never an error.
- ``parallel_tool_calls`` false: the first complete call ends the answer.

Pure logic, fed text: ``generate.py`` drives it with the decoded tokens.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from lllmsd.engines.llama_cpp.tools.parse import ArgumentScans, ParsedCall, ParsedCalls, parse_calls
from lllmsd.engines.llama_cpp.tools.syntax import CallSyntax

log = logging.getLogger(__name__)


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


@dataclass(frozen=True, slots=True)
class CallFragment:
    """A piece of one output call; the first piece of a call has ``id`` and ``name``."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class CallsEnd:
    """How the answer ends: the last fragments, text to return as content, and the finish reason."""

    fragments: list[CallFragment]
    content: str
    finish_reason: str


@dataclass(slots=True)
class _Out:
    id: str
    name: str
    sent: int = 0  # characters of arguments sent


class CallTracker:
    """Follows the call section of one answer. ``live``: fragments are streamed as they come (else they
    all come at the end, whole, when it is known which calls are returned)."""

    def __init__(
        self,
        syntax: CallSyntax,
        names: frozenset[str],
        *,
        live: bool,
        parallel: bool = True,
        new_id: Callable[[], str] = new_call_id,
    ) -> None:
        self.syntax = syntax
        self.names = names
        self.live = live
        self.parallel = parallel
        self._new_id = new_id
        self.text = ""
        self.parsed = ParsedCalls()
        self._scans: ArgumentScans = {}  # each call's arguments are scanned once, across feeds
        self._out: list[_Out] = []
        self.stop = False  # generation should end: a repeat completed, or the calls are closed

    def feed(self, text: str) -> list[CallFragment]:
        self.text += text
        self.parsed = parse_calls(self.text, self.syntax, self._scans)
        kinds = self._classify()
        if "repeat" in kinds or self.parsed.state in ("closed", "malformed") or "unknown" in kinds:
            self.stop = True
        if not self.parallel and "call" in kinds:
            self.stop = True
        return self._fragments(kinds) if self.live else []

    def finish(self, reason: str) -> CallsEnd:
        """The generation ended: ``reason`` is ``stop`` (the model ended, or a stop sequence) or
        ``length``."""
        kinds = self._classify()
        fragments = self._fragments(kinds, final=True)
        calls = kinds.count("call")
        content = ""
        truncated = False
        for call, kind in zip(self.parsed.calls, kinds, strict=True):
            if kind == "open" or (kind == "held" and not self._could_repeat(call)):
                truncated = True
                if not (self.live and kind == "open"):  # a streamed call cannot be taken back
                    content = self.text[call.start :]
            elif kind == "unknown":
                log.warning("tool call to an unknown function %r returned as content", call.name)
                content = self.text[call.start :]
        if self.parsed.state == "malformed":
            log.warning(
                "model output is not a %s tool call (%s): returned as content", self.syntax.family, self.parsed.problem
            )
            content = self.text[self.parsed.end :] if calls else self.text
        if calls and not truncated and not content.strip():
            return CallsEnd(fragments, "", "tool_calls")
        if not calls and not (self.live and "open" in kinds):
            content = self.text  # no call at all: the whole text is content, the syntax's opening included
        if truncated or reason == "length":
            return CallsEnd(fragments, content, "length")
        return CallsEnd(fragments, content, "tool_calls" if calls else "stop")

    # ------------------------------------------------------------------------------------------ logic

    def _classify(self) -> list[str]:
        """Per parsed call: ``call`` (complete, returned), ``repeat`` (complete, an earlier call again),
        ``open`` (incomplete, cannot be a repeat: streamed), ``held`` (incomplete, may still be a repeat
        or has no name yet), ``unknown`` (names a function not offered)."""
        kinds: list[str] = []
        done: list[tuple[str, str]] = []
        for call in self.parsed.calls:
            if call.name_done and call.name not in self.names:
                kinds.append("unknown")
                break
            if call.complete:
                if (call.name, call.arguments) in done:
                    kinds.append("repeat")
                else:
                    kinds.append("call")
                    done.append((call.name, call.arguments))
            elif not call.name_done or self._could_repeat(call, done):
                kinds.append("held")
            else:
                kinds.append("open")
        kinds += ["dropped"] * (len(self.parsed.calls) - len(kinds))
        return kinds

    def _could_repeat(self, call: ParsedCall, done: list[tuple[str, str]] | None = None) -> bool:
        if done is None:
            done = [(c.name, c.arguments) for c in self.parsed.calls if c.complete]
        if not call.name_done:
            return bool(done)  # no name yet: after a call it may be that call again
        return any(name == call.name and arguments.startswith(call.arguments) for name, arguments in done)

    def _fragments(self, kinds: list[str], final: bool = False) -> list[CallFragment]:
        fragments: list[CallFragment] = []
        index = 0
        for call, kind in zip(self.parsed.calls, kinds, strict=False):
            if kind not in ("call", "open"):
                continue
            if kind == "open" and not self.live:
                continue  # not returned: cut off
            if index == len(self._out):
                self._out.append(_Out(self._new_id(), call.name))
                out = self._out[index]
                fragments.append(CallFragment(index, call.arguments, id=out.id, name=out.name))
                out.sent = len(call.arguments)
            else:
                out = self._out[index]
                if len(call.arguments) > out.sent:
                    fragments.append(CallFragment(index, call.arguments[out.sent :]))
                    out.sent = len(call.arguments)
            index += 1
        return fragments
