"""Reading tool calls back out of generated text, complete or cut off at any character.

``parse_calls`` reads the text of a call section (what follows a trigger, or a whole forced answer) in a
family's ``CallSyntax``, and says how far it got: each call's name and compact arguments so far, whether
each is complete, and the state of the whole (more may come, it ended, or it is not this syntax). It is
called again on the whole text after every token, so it holds no state: a section is a few hundred
characters, and re-reading it keeps streaming and non-streaming on one code path. The one part that can
be long, a call's arguments, is scanned once: pass the same ``ArgumentScans`` with each call, and each
scan goes on from where it stopped (the text only ever grows).

Tolerated, because models write it: any whitespace around the syntax's pieces and inside the JSON
(arguments come back compact, as OpenAI's do), ``parameters`` for ``arguments`` and back, and the
family's optional prefix marker. Not tolerated: the arguments before the name (no family writes that), or
arguments that are not a JSON object.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Literal

from lllmsd.engines.llama_cpp.tools.syntax import CallSyntax

ARGUMENT_KEYS = ("arguments", "parameters")
_PIECE = re.compile(r"<[^<>\s]+>|\[[A-Z_]+\]|\S")  # a literal's pieces: a tag, a marker, one character
_MORE = object()  # the text ended inside what was being read: more may come


@dataclass(slots=True)
class ParsedCall:
    name: str = ""
    name_done: bool = False
    arguments: str = ""  # compact JSON text so far
    arguments_done: bool = False
    complete: bool = False  # the call's closing text included
    start: int = 0
    end: int = 0  # just after the call, once complete


State = Literal["partial", "between", "closed", "malformed"]


@dataclass(slots=True)
class ParsedCalls:
    """``state``: ``partial`` (inside a call or a piece of syntax: more must come), ``between`` (after a
    complete call: the text may end here, or go on with another call), ``closed`` (the syntax's closing
    text came: nothing more may follow), ``malformed`` (not this syntax from ``end`` on)."""

    calls: list[ParsedCall] = field(default_factory=list)
    state: State = "partial"
    end: int = 0  # after the last complete call (or the close)
    problem: str | None = None

    @property
    def complete_calls(self) -> list[ParsedCall]:
        return [c for c in self.calls if c.complete]


class _Malformed(Exception):
    pass


@dataclass(slots=True)
class _Scan:
    """How far the arguments starting at one position have been read."""

    pos: int
    out: list[str] = field(default_factory=list)
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    done: bool = False


ArgumentScans = dict[int, _Scan]  # by the position where the arguments start


def parse_calls(text: str, syntax: CallSyntax, scans: ArgumentScans | None = None) -> ParsedCalls:
    """Read ``text`` (starting at the call section) as calls in ``syntax``. ``scans``: the argument scans
    of earlier calls on shorter prefixes of this text, to go on from."""
    result = ParsedCalls()
    reader = _Reader(text, {} if scans is None else scans)
    try:
        if reader.literal(syntax.open) is _MORE:
            return result
        if syntax.optional_prefix and reader.optional(syntax.optional_prefix) is _MORE:
            return result
        result.end = reader.pos
        while True:
            call = ParsedCall(start=reader.pos)
            result.calls.append(call)
            if _read_call(reader, syntax, call) is _MORE:
                return result
            result.end = reader.pos
            result.state = "between"
            if syntax.close:
                mark = reader.pos
                if reader.optional(syntax.close) is _MORE:
                    return result
                if reader.pos != mark:
                    result.state, result.end = "closed", reader.pos
                    if reader.rest().strip():
                        raise _Malformed("text after the calls")
                    return result
            if syntax.separator.strip() and reader.literal(syntax.separator) is _MORE:
                return result
            if reader.at_end():
                return result
            result.state = "partial"
    except _Malformed as exc:
        result.state = "malformed"
        result.problem = str(exc)
        if result.calls and not result.calls[-1].complete:
            result.calls.pop()
        return result


def _read_call(reader: _Reader, syntax: CallSyntax, call: ParsedCall) -> object:
    for step in (syntax.call_open, "{", '"name"', ":"):
        if reader.literal(step) is _MORE:
            return _MORE
    name = reader.string()
    call.name = name[0]
    if name[1] is _MORE:
        return _MORE
    call.name_done = True
    if reader.literal(",") is _MORE:
        return _MORE
    key = reader.string()
    if key[1] is _MORE:
        if not any(k.startswith(key[0]) for k in ARGUMENT_KEYS):
            raise _Malformed(f"expected the arguments, got {key[0]!r}")
        return _MORE
    if key[0] not in ARGUMENT_KEYS:
        raise _Malformed(f"expected the arguments, got {key[0]!r}")
    if reader.literal(":") is _MORE:
        return _MORE
    arguments, done = reader.json_object()
    call.arguments = arguments
    if not done:
        return _MORE
    try:
        json.loads(arguments)
    except ValueError as exc:
        raise _Malformed(f"the arguments are not JSON: {exc}") from None
    call.arguments_done = True
    for step in ("}", syntax.call_close):
        if reader.literal(step) is _MORE:
            return _MORE
    call.complete = True
    call.end = reader.pos
    return None


class _Reader:
    """A cursor over text that may end anywhere: each read returns ``_MORE`` when the text ran out
    inside what it reads, and raises ``_Malformed`` when the text cannot be it."""

    def __init__(self, text: str, scans: ArgumentScans) -> None:
        self.text = text
        self.pos = 0
        self.scans = scans

    def at_end(self) -> bool:
        self.skip_space()
        return self.pos >= len(self.text)

    def rest(self) -> str:
        return self.text[self.pos :]

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def literal(self, literal: str) -> object:
        """Each piece of ``literal`` in turn, with any whitespace before each."""
        for piece in _PIECE.findall(literal):
            self.skip_space()
            ahead = self.text[self.pos : self.pos + len(piece)]
            if ahead == piece:
                self.pos += len(piece)
            elif piece.startswith(ahead) and self.pos + len(ahead) == len(self.text):
                self.pos = len(self.text)
                return _MORE
            else:
                raise _Malformed(f"expected {piece!r} at {self.pos}, got {ahead!r}")
        return None

    def optional(self, literal: str) -> object:
        """``literal`` if it is there (or may still be: ``_MORE``); else nothing is read."""
        start = self.pos
        try:
            return self.literal(literal)
        except _Malformed:
            self.pos = start
            return None

    def string(self) -> tuple[str, object]:
        """A JSON string: (its value so far, ``_MORE`` if it is not closed yet)."""
        self.skip_space()
        if self.pos >= len(self.text):
            return "", _MORE
        if self.text[self.pos] != '"':
            raise _Malformed(f"expected a string at {self.pos}")
        end = self.pos + 1
        escaped = False
        while end < len(self.text):
            char = self.text[end]
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                raw = self.text[self.pos : end + 1]
                self.pos = end + 1
                try:
                    return json.loads(raw), None
                except ValueError:
                    raise _Malformed(f"bad string {raw[:40]!r}") from None
            end += 1
        partial = self.text[self.pos + 1 :]
        self.pos = len(self.text)
        return partial.rstrip("\\"), _MORE

    def json_object(self) -> tuple[str, bool]:
        """A JSON object without insignificant whitespace: (compact text so far, whether it closed)."""
        self.skip_space()
        if self.pos < len(self.text) and self.text[self.pos] != "{":
            raise _Malformed("the arguments are not a JSON object")
        scan = self.scans.setdefault(self.pos, _Scan(self.pos))
        text, out = self.text, scan.out
        while not scan.done and scan.pos < len(text):
            char = text[scan.pos]
            scan.pos += 1
            if scan.in_string:
                out.append(char)
                if scan.escaped:
                    scan.escaped = False
                elif char == "\\":
                    scan.escaped = True
                elif char == '"':
                    scan.in_string = False
                continue
            if char.isspace():
                continue
            out.append(char)
            if char == '"':
                scan.in_string = True
            elif char in "{[":
                scan.depth += 1
            elif char in "}]":
                scan.depth -= 1
                scan.done = scan.depth == 0
        self.pos = scan.pos
        return "".join(out), scan.done
