"""JSON Schema ``pattern`` regexes as GBNF over the text of a JSON string.

llama-cpp-python's converter copies a pattern almost verbatim into GBNF: ``\\d`` and ``\\.`` reach llama.cpp's
grammar parser, which refuses them, and a pattern without ``^...$`` is an assertion error. JSON Schema
patterns are ECMA 262 regexes that *search* (``"\\d{3}"`` accepts any string containing three digits) and
OpenAI's structured outputs accept them anchored or not. This module reads such a regex and writes GBNF
that generates exactly the JSON string contents (between the quotes) whose decoded text matches:

- escapes: ``\\d \\w \\s \\D \\W \\S``, ``\\t \\n \\r \\f \\v \\0``, ``\\xHH``, ``\\uHHHH``, and an escaped
  punctuation character (``\\.``, ``\\-``, ``\\/``, ...) as itself, inside and outside classes;
- classes ``[...]`` and ``[^...]`` with ranges, ``.``, groups ``(...)``, ``(?:...)`` and ``(?<name>...)``,
  alternation, and the quantifiers ``* + ? {n} {n,} {n,m}`` (a lazy ``?`` after one changes nothing here);
- ``^`` and ``$`` at the start and end of the pattern (or of one of its top-level alternatives); where one
  is missing, any characters may come before or after the match, as a search allows.

A character the JSON text must escape is written escaped: ``"`` as ``\\"``, ``\\`` as ``\\\\``, and the
control characters with a short JSON escape (``\\b \\f \\n \\r \\t``) as that escape; other control
characters are never generated (the grammar then admits fewer strings, all of them matching). What the
grammar cannot express (lookaround, backreferences, word boundaries, anchors inside the pattern) raises
``PatternError``, which the engine reports as a 400 naming the schema path of the pattern.
"""

from __future__ import annotations

import json
from collections.abc import Callable

MAX_CODEPOINT = 0x10FFFF
Ranges = list[tuple[int, int]]  # sorted, disjoint, inclusive code point ranges

_DIGITS: Ranges = [(0x30, 0x39)]
_WORD: Ranges = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
_SPACE: Ranges = [(0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x2028, 0x2029), (0xFEFF, 0xFEFF)]
_CHAR_ESCAPES = {"t": 0x09, "n": 0x0A, "v": 0x0B, "f": 0x0C, "r": 0x0D, "0": 0x00}
_CLASS_ESCAPES = {"d": _DIGITS, "w": _WORD, "s": _SPACE}
# what the JSON text of a string writes for these characters (the others below 0x20 are not generated)
_JSON_ESCAPED = {0x22: '\\"', 0x5C: "\\\\", 0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0C: "\\f", 0x0D: "\\r"}
# characters a JSON string holds unescaped: everything but controls, '"' and '\' (and lone surrogates)
_PLAIN: Ranges = [(0x20, 0x21), (0x23, 0x5B), (0x5D, 0xD7FF), (0xE000, MAX_CODEPOINT)]
_QUANTIFIERS = frozenset("*+?{")


class PatternError(ValueError):
    """A pattern the grammar cannot express, or not a valid regex."""


Repetition = Callable[[str, int, int | None], str]  # GBNF for min to max (None: no limit) of an item


def pattern_gbnf(pattern: str, repetition: Repetition) -> str:
    """GBNF for the contents of a JSON string (without its quotes) whose text matches ``pattern``; counted
    repetition is written by ``repetition`` (the converter's, which llama.cpp can parse at any count)."""
    return _Reader(pattern, repetition).top()


def _normalize(ranges: Ranges) -> Ranges:
    out: Ranges = []
    for low, high in sorted(ranges):
        if out and low <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], high))
        else:
            out.append((low, high))
    return out


def _complement(ranges: Ranges) -> Ranges:
    out: Ranges = []
    start = 0
    for low, high in _normalize(ranges):
        if low > start:
            out.append((start, low - 1))
        start = high + 1
    if start <= MAX_CODEPOINT:
        out.append((start, MAX_CODEPOINT))
    return out


def _intersect(a: Ranges, b: Ranges) -> Ranges:
    out: Ranges = []
    for low_a, high_a in a:
        for low_b, high_b in b:
            low, high = max(low_a, low_b), min(high_a, high_b)
            if low <= high:
                out.append((low, high))
    return _normalize(out)


def _contains(ranges: Ranges, point: int) -> bool:
    return any(low <= point <= high for low, high in ranges)


def _gbnf_char(point: int) -> str:
    if point < 0x80 and chr(point).isalnum():
        return chr(point)
    if point <= 0xFF:
        return f"\\x{point:02X}"
    if point <= 0xFFFF:
        return f"\\u{point:04X}"
    return f"\\U{point:08X}"


def _literal(text: str) -> str:
    """A GBNF string literal for ``text``, every character that could need escaping written as a code."""
    return '"' + "".join(_gbnf_char(ord(char)) for char in text) + '"'


def _json_text(char: str) -> str:
    return json.dumps(char, ensure_ascii=False)[1:-1]


def _class_gbnf(ranges: Ranges) -> str:
    """GBNF for one character of ``ranges`` as the JSON text writes it."""
    ranges = _normalize(ranges)
    parts = []
    plain = _intersect(ranges, _PLAIN)
    if plain:
        body = "".join(_gbnf_char(lo) if lo == hi else f"{_gbnf_char(lo)}-{_gbnf_char(hi)}" for lo, hi in plain)
        parts.append(f"[{body}]")
    parts += [_literal(text) for point, text in _JSON_ESCAPED.items() if _contains(ranges, point)]
    if not parts:
        raise PatternError("a character class that matches no character a JSON string can hold")
    return parts[0] if len(parts) == 1 else f"({' | '.join(parts)})"


ANY_CHAR = _class_gbnf([(0, MAX_CODEPOINT)])


class _Reader:
    """A recursive-descent reader of the ECMA 262 regex subset above, writing GBNF as it goes. Nesting is
    bounded by the API's limit on a pattern's groups (api/schemas/json_schema.py)."""

    def __init__(self, pattern: str, repetition: Repetition) -> None:
        self.src = pattern
        self.pos = 0
        self.repetition = repetition

    def fail(self, message: str) -> PatternError:
        return PatternError(f"{message} (at offset {self.pos} of /{self.src[:80]}/)")

    def peek(self) -> str:
        return self.src[self.pos] if self.pos < len(self.src) else ""

    def top(self) -> str:
        alternatives = []
        while True:
            anchored_start = self.peek() == "^"
            if anchored_start:
                self.pos += 1
            items = self.sequence(top=True)
            anchored_end = self.peek() == "$"
            if anchored_end:
                self.pos += 1
            head = [] if anchored_start else [f"{ANY_CHAR}*"]
            tail = [] if anchored_end else [f"{ANY_CHAR}*"]
            alternatives.append(" ".join([*head, *items, *tail]))
            if self.peek() == "|":
                self.pos += 1
                continue
            if self.pos < len(self.src):
                raise self.fail("unbalanced ')'" if self.peek() == ")" else "'$' is only supported at the end")
            break
        return _alternation(alternatives)

    def alternation(self) -> str:
        alternatives = [" ".join(self.sequence(top=False))]
        while self.peek() == "|":
            self.pos += 1
            alternatives.append(" ".join(self.sequence(top=False)))
        return _alternation(alternatives)

    def sequence(self, top: bool) -> list[str]:
        items: list[str] = []
        while self.pos < len(self.src) and self.peek() not in "|)":
            if self.peek() == "$":
                if top:
                    return items
                raise self.fail("'$' is only supported at the end of the pattern")
            atom = self.atom()
            atom = self.quantified(atom)
            if atom:
                items.append(atom)
        return items

    def quantified(self, atom: str) -> str:
        char = self.peek()
        if char not in _QUANTIFIERS or not char:
            return atom
        if char == "{":
            bounds = self.braces()
            if bounds is None:
                return atom  # a "{" that starts no quantifier is a literal (ECMA 262 annex B)
            low, high = bounds
        else:
            self.pos += 1
            low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[char]
        if self.peek() == "?":
            self.pos += 1  # lazy: the same strings match
        if self.peek() in _QUANTIFIERS and self.peek():
            raise self.fail("a quantifier cannot follow a quantifier")
        if not atom:
            return ""
        return self.repetition(atom if _atomic(atom) else f"({atom})", low, high)

    def braces(self) -> tuple[int, int | None] | None:
        end = self.src.find("}", self.pos)
        body = self.src[self.pos + 1 : end] if end > 0 else ""
        low_text, comma, high_text = body.partition(",")
        if end < 0 or not low_text.strip().isdigit() or (high_text.strip() and not high_text.strip().isdigit()):
            return None
        self.pos = end + 1
        low = int(low_text)
        high = (int(high_text) if high_text.strip() else None) if comma else low
        if high is not None and high < low:
            raise self.fail(f"the quantifier {{{body}}} has its maximum below its minimum")
        return low, high

    def atom(self) -> str:
        char = self.peek()
        if char == "(":
            return self.group()
        if char == "[":
            return _class_gbnf(self.char_class())
        if char == ".":
            self.pos += 1
            return _class_gbnf(_complement([(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)]))
        if char == "^":
            raise self.fail("'^' is only supported at the start of the pattern")
        if char == "{" and self.braces() is None:
            self.pos += 1
            return self.char_literal(ord(char))  # a "{" that starts no quantifier (ECMA 262 annex B)
        if char in _QUANTIFIERS:
            raise self.fail("nothing to repeat")
        if char == "\\":
            ranges = self.escape(in_class=False)
            if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
                return self.char_literal(ranges[0][0])
            return _class_gbnf(ranges)
        self.pos += 1
        return self.char_literal(ord(char))

    def char_literal(self, point: int) -> str:
        if point < 0x20 and point not in _JSON_ESCAPED:
            raise self.fail(f"the control character U+{point:04X} cannot be generated in a JSON string")
        return _literal(_json_text(chr(point)))

    def group(self) -> str:
        self.pos += 1
        if self.src.startswith("?:", self.pos):
            self.pos += 2
        elif self.src.startswith("?<", self.pos) and self.src[self.pos + 2 : self.pos + 3] not in ("=", "!"):
            end = self.src.find(">", self.pos)
            if end < 0:
                raise self.fail("unterminated group name")
            self.pos = end + 1
        elif self.peek() == "?":
            raise self.fail("lookahead and lookbehind ((?=, (?!, (?<=, (?<!) are not supported")
        inner = self.alternation()
        if self.peek() != ")":
            raise self.fail("unbalanced '('")
        self.pos += 1
        return f"({inner})" if inner else ""

    def char_class(self) -> Ranges:
        self.pos += 1
        negated = self.peek() == "^"
        if negated:
            self.pos += 1
        ranges: Ranges = []
        while self.peek() != "]":
            if not self.peek():
                raise self.fail("unterminated character class")
            low = self.class_item()
            if self.peek() == "-" and self.src[self.pos + 1 : self.pos + 2] not in ("]", ""):
                self.pos += 1
                high = self.class_item()
                if len(low) != 1 or len(high) != 1 or low[0][0] != low[0][1] or high[0][0] != high[0][1]:
                    raise self.fail("a range in a class must be between two characters")
                if high[0][0] < low[0][0]:
                    raise self.fail("a range in a class is out of order")
                ranges.append((low[0][0], high[0][0]))
            else:
                ranges += low
        self.pos += 1
        return _complement(ranges) if negated else _normalize(ranges)

    def class_item(self) -> Ranges:
        if self.peek() == "\\":
            return self.escape(in_class=True)
        point = ord(self.peek())
        self.pos += 1
        return [(point, point)]

    def escape(self, in_class: bool) -> Ranges:
        kind = self.src[self.pos + 1 : self.pos + 2]
        self.pos += 2
        if not kind:
            raise self.fail("a pattern cannot end with '\\'")
        if kind.lower() in _CLASS_ESCAPES:
            ranges = _CLASS_ESCAPES[kind.lower()]
            return _complement(ranges) if kind.isupper() else list(ranges)
        if kind in _CHAR_ESCAPES:
            point = _CHAR_ESCAPES[kind]
            return [(point, point)]
        if kind in "xu":
            digits = 2 if kind == "x" else 4
            code = self.src[self.pos : self.pos + digits]
            if len(code) != digits or any(c not in "0123456789abcdefABCDEF" for c in code):
                raise self.fail(f"\\{kind} needs {digits} hex digits")
            self.pos += digits
            return [(int(code, 16), int(code, 16))]
        if kind == "b" and in_class:
            return [(0x08, 0x08)]
        if kind in "bB":
            raise self.fail("word boundaries (\\b, \\B) are not supported")
        if kind.isdigit() or kind == "k":
            raise self.fail("backreferences are not supported")
        if kind in "pP":
            raise self.fail("Unicode property escapes (\\p, \\P) are not supported")
        if kind.isalnum():
            raise self.fail(f"unknown escape \\{kind}")
        return [(ord(kind), ord(kind))]  # an escaped punctuation character: itself


def _alternation(alternatives: list[str]) -> str:
    filled = [alt for alt in alternatives if alt]
    if not filled:
        return ""
    body = filled[0] if len(filled) == 1 else " | ".join(filled)
    if len(filled) < len(alternatives):  # an empty alternative: the rest is optional
        return f"({body})?"
    return body if len(filled) == 1 else f"({body})"


def _atomic(expr: str) -> bool:
    """Whether ``expr`` is one GBNF item that a quantifier can follow without parentheses."""
    if (expr.startswith("(") and expr.endswith(")")) or (expr.startswith("[") and expr.endswith("]")):
        depth = 0
        for index, char in enumerate(expr):  # the opening bracket must close at the very end
            depth += char in "(["
            depth -= char in ")]"
            if depth == 0 and index < len(expr) - 1:
                return False
        return True
    return expr.startswith('"') and expr.endswith('"') and expr.count('"') == 2
