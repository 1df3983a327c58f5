"""Bounds on a GBNF grammar, checked in Python before llama.cpp's parser ever sees the text.

llama.cpp's grammar parser (``llama_sampler_init_grammar``) is recursive C++ and trusts its input: a
grammar with 20,000 nested parentheses overflows the stack (SIGSEGV), ``"a"{5,3}`` makes it create rules
until memory runs out, a long chain of rules costs quadratic memory (5,000 rules: 430 MB), a few dozen
ambiguous rules make it build exponentially many parse stacks (16 rules: minutes), and a grammar it refuses
is written to stderr in full. So every grammar the engine hands to llama.cpp (a request's ``grammar``, a
named one from the config) is first read here by a parser that mirrors llama.cpp's syntax
(src/llama-grammar.cpp) and refused with a 400 naming ``grammar`` when it is:

- longer than ``MAX_GRAMMAR_CHARS`` (64 KiB; llama-server has no limit, vLLM none for its own grammars);
- nested deeper than ``MAX_GRAMMAR_DEPTH`` (64) parentheses, or rules referring to rules (a rule that
  refers to itself, directly or not, is recursion: it ends the count, as generation bounds it);
- ambiguous enough that one step of the parse opens more than ``MAX_GRAMMAR_EXPANSION`` (4,096)
  alternatives at once (the count is an estimate: the leftmost derivations of a rule);
- malformed: a syntax error, a reference to a rule that is not defined, no ``root``, left recursion, a
  ``<token>`` that is not one token of the model (checked by the engine, which has the vocabulary), or a
  repetition llama.cpp refuses or silently changes: ``x{m,n}`` with n < m, more than 2,000 repetitions
  (llama.cpp's ``MAX_REPETITION_THRESHOLD``: it refuses m > 2,000 and quietly drops an upper bound above
  it), or a repeated group whose rules times the repetitions exceed that threshold.

Grammars generated from JSON Schemas (grammar.py) are bounded by the schema's limits instead, and written
so that llama.cpp accepts them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lllmsd.errors import InvalidRequest

MAX_GRAMMAR_CHARS = 65_536
MAX_GRAMMAR_DEPTH = 64
MAX_GRAMMAR_EXPANSION = 4_096
LLAMA_MAX_REPETITION = 2_000  # llama.cpp's MAX_REPETITION_THRESHOLD (src/llama-grammar.cpp)
_MAX_TOKEN_ID = 2**31 - 1

_ESCAPES = {"x": 2, "u": 4, "U": 8}
_SIMPLE_ESCAPES = set('tnr\\"[]-')
_HEX = set("0123456789abcdefABCDEF")


class GrammarProblem(ValueError):
    """What is wrong with a grammar, and where (a character offset)."""

    def __init__(self, message: str, pos: int | None = None) -> None:
        super().__init__(message)
        self.pos = pos


# A symbol of an alternative: ("t",) a terminal (literal, class, token, "."), ("r", name) a rule reference,
# ("rep", symbol, min, max) a repetition (max None: unbounded). Groups become rules of their own, as in
# llama.cpp, named "(n)".
Symbol = tuple


@dataclass
class _Grammar:
    rules: dict[str, list[list[Symbol]]] = field(default_factory=dict)
    referenced: dict[str, int] = field(default_factory=dict)  # name -> offset of its first use
    symbols: int = 0  # llama.cpp's symbol_ids.size(): names seen and rules generated so far
    known: set[str] = field(default_factory=set)
    groups: int = 0
    tokens: list[str] = field(default_factory=list)  # the <token> texts, which only the vocabulary can judge

    def name_seen(self, name: str) -> None:
        if name not in self.known:
            self.known.add(name)
            self.symbols += 1


def gbnf_tokens(text: str) -> list[str]:
    """The ``<token>`` texts of a grammar ``check_gbnf`` accepted: llama.cpp refuses (printing the whole
    grammar) one that is not exactly one token of the model, so the engine checks them with its vocabulary."""
    return _Parser(text).parse().tokens if "<" in text else []


def check_gbnf(text: str, param: str = "grammar") -> None:
    """Raise InvalidRequest (400, ``param``) unless llama.cpp can take ``text`` safely."""
    if len(text) > MAX_GRAMMAR_CHARS:
        raise InvalidRequest(
            f"{param} has {len(text)} characters; grammars may have at most {MAX_GRAMMAR_CHARS}",
            param=param,
            code="invalid_value",
        )
    try:
        grammar = _Parser(text).parse()
        _check_structure(grammar)
    except GrammarProblem as problem:
        where = f" (line {text.count(chr(10), 0, problem.pos) + 1})" if problem.pos is not None else ""
        raise InvalidRequest(f"{param}: {problem}{where}", param=param, code="invalid_value") from None


class _Parser:
    """llama.cpp's GBNF syntax (llama_grammar_parser), read into rules; nothing is expanded."""

    def __init__(self, text: str) -> None:
        if "\x00" in text:
            raise GrammarProblem("NUL characters are not allowed", text.index("\x00"))
        self.src = text
        self.n = len(text)
        self.g = _Grammar()

    def at(self, pos: int) -> str:
        return self.src[pos] if pos < self.n else ""

    def parse(self) -> _Grammar:
        pos = self.space(0, newline_ok=True)
        while pos < self.n:
            pos = self.rule(pos)
        return self.g

    # -- lexical pieces
    def space(self, pos: int, newline_ok: bool) -> int:
        while pos < self.n:
            c = self.src[pos]
            if c == "#":
                while pos < self.n and self.src[pos] not in "\r\n":
                    pos += 1
            elif c in " \t" or (newline_ok and c in "\r\n"):
                pos += 1
            else:
                break
        return pos

    def name(self, pos: int) -> int:
        start = pos
        while pos < self.n and (self.src[pos].isascii() and (self.src[pos].isalnum() or self.src[pos] == "-")):
            pos += 1
        if pos == start:
            raise GrammarProblem("expecting a rule name", start)
        return pos

    def integer(self, pos: int) -> tuple[int, int]:
        start = pos
        while pos < self.n and self.src[pos] in "0123456789":
            pos += 1
        if pos == start:
            raise GrammarProblem("expecting an integer", start)
        if pos - start > 9:
            raise GrammarProblem(f"the number {self.src[start:pos]} is too large", start)
        return int(self.src[start:pos]), pos

    def char(self, pos: int) -> int:
        if pos >= self.n:
            raise GrammarProblem("unexpected end of input", pos)
        if self.src[pos] != "\\":
            return pos + 1
        kind = self.at(pos + 1)
        if kind in _ESCAPES:
            digits = self.src[pos + 2 : pos + 2 + _ESCAPES[kind]]
            if len(digits) != _ESCAPES[kind] or not set(digits) <= _HEX:
                raise GrammarProblem(f"expecting {_ESCAPES[kind]} hex digits after \\{kind}", pos)
            return pos + 2 + _ESCAPES[kind]
        if kind in _SIMPLE_ESCAPES:
            return pos + 2
        raise GrammarProblem(f"unknown escape \\{kind}", pos)

    # -- structure
    def rule(self, pos: int) -> int:
        end = self.name(pos)
        name = self.src[pos:end]
        self.g.name_seen(name)
        pos = self.space(end, newline_ok=False)
        if self.src[pos : pos + 3] != "::=":
            raise GrammarProblem("expecting ::=", pos)
        pos = self.space(pos + 3, newline_ok=True)
        alternatives, pos = self.alternates(pos, nested=False, depth=0)
        self.g.rules[name] = self.g.rules.get(name, []) + alternatives  # llama.cpp: a redefinition replaces;
        # keeping both only overestimates, which is the safe side
        if self.at(pos) == "\r":
            pos += 2 if self.at(pos + 1) == "\n" else 1
        elif self.at(pos) == "\n":
            pos += 1
        elif pos < self.n:
            raise GrammarProblem("expecting a newline or the end", pos)
        return self.space(pos, newline_ok=True)

    def alternates(self, pos: int, nested: bool, depth: int) -> tuple[list[list[Symbol]], int]:
        alternatives = []
        sequence, pos = self.sequence(pos, nested, depth)
        alternatives.append(sequence)
        while self.at(pos) == "|":
            pos = self.space(pos + 1, newline_ok=True)
            sequence, pos = self.sequence(pos, nested, depth)
            alternatives.append(sequence)
        return alternatives, pos

    def sequence(self, pos: int, nested: bool, depth: int) -> tuple[list[Symbol], int]:
        seq: list[Symbol] = []
        prev_rules = 1  # llama.cpp's n_prev_rules: the rules the last symbol brought along
        while pos < self.n:
            c = self.src[pos]
            if c == '"':
                pos += 1
                while self.at(pos) != '"':
                    pos = self.char(pos)
                seq.append(("t",))
                prev_rules = 1
                pos = self.space(pos + 1, nested)
            elif c == "[":
                pos += 1
                if self.at(pos) == "^":
                    pos += 1
                while self.at(pos) != "]":
                    pos = self.char(pos)
                    if self.at(pos) == "-" and self.at(pos + 1) not in ("]", ""):
                        pos = self.char(pos + 1)
                    elif self.at(pos) == "-" and pos + 1 >= self.n:
                        raise GrammarProblem("unexpected end of input", pos)
                seq.append(("t",))
                prev_rules = 1
                pos = self.space(pos + 1, nested)
            elif c in "<!":
                pos = self.token(pos)
                seq.append(("t",))
                prev_rules = 1
                pos = self.space(pos, nested)
            elif c.isascii() and (c.isalnum() or c == "-"):
                end = self.name(pos)
                name = self.src[pos:end]
                self.g.name_seen(name)
                self.g.referenced.setdefault(name, pos)
                seq.append(("r", name))
                prev_rules = 1
                pos = self.space(end, nested)
            elif c == "(":
                if depth + 1 > MAX_GRAMMAR_DEPTH:
                    raise GrammarProblem(f"parentheses nested deeper than {MAX_GRAMMAR_DEPTH} levels", pos)
                before = self.g.symbols
                self.g.symbols += 1
                self.g.groups += 1
                group = f"({self.g.groups})"
                inner, pos = self.alternates(self.space(pos + 1, newline_ok=True), nested=True, depth=depth + 1)
                self.g.rules[group] = inner
                prev_rules = max(1, self.g.symbols - before)
                if self.at(pos) != ")":
                    raise GrammarProblem("expecting ')'", pos)
                seq.append(("r", group))
                pos = self.space(pos + 1, nested)
            elif c == ".":
                seq.append(("t",))
                prev_rules = 1
                pos = self.space(pos + 1, nested)
            elif c in "*+?":
                low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
                prev_rules = self.repeat(seq, low, high, prev_rules, pos)
                pos = self.space(pos + 1, nested)
            elif c == "{":
                start = pos
                pos = self.space(pos + 1, nested)
                low, pos = self.integer(pos)
                pos = self.space(pos, nested)
                high: int | None = low
                if self.at(pos) == ",":
                    pos = self.space(pos + 1, nested)
                    high = None
                    if self.at(pos) in tuple("0123456789"):
                        high, pos = self.integer(pos)
                        pos = self.space(pos, nested)
                if self.at(pos) != "}":
                    raise GrammarProblem("expecting '}'", pos)
                pos = self.space(pos + 1, nested)
                prev_rules = self.repeat(seq, low, high, prev_rules, start)
            else:
                break
        return seq, pos

    def repeat(self, seq: list[Symbol], low: int, high: int | None, prev_rules: int, pos: int) -> int:
        if not seq:
            raise GrammarProblem("a repetition needs an item before it", pos)
        if high is not None and high < low:
            raise GrammarProblem(f"the repetition {{{low},{high}}} has its maximum below its minimum", pos)
        if max(low, high or 0) > LLAMA_MAX_REPETITION:
            raise GrammarProblem(
                f"repetitions above {LLAMA_MAX_REPETITION} are not enforced by llama.cpp; "
                f"nest them instead, e.g. (x{{1000}}){{3}}",
                pos,
            )
        total = high if high else (low or 1)
        if prev_rules * total > LLAMA_MAX_REPETITION:
            raise GrammarProblem(
                f"a group of {prev_rules} rules repeated {total} times exceeds llama.cpp's limit of "
                f"{LLAMA_MAX_REPETITION} rules",
                pos,
            )
        self.g.symbols += 1 if high is None else high - low
        seq[-1] = ("rep", seq[-1], low, high)
        return prev_rules * total

    def token(self, pos: int) -> int:
        if self.at(pos) == "!":
            pos += 1
        if self.at(pos) != "<":
            raise GrammarProblem("expecting '<'", pos)
        pos += 1
        if self.at(pos) == "[":
            value, pos = self.integer(pos + 1)
            if value > _MAX_TOKEN_ID:
                raise GrammarProblem("token id out of range", pos)
            if self.src[pos : pos + 2] != "]>":
                raise GrammarProblem("expecting ']>'", pos)
            return pos + 2
        end = self.src.find(">", pos)
        if end < 0:
            raise GrammarProblem("expecting '>'", pos)
        self.g.tokens.append(self.src[pos - 1 : end + 1])
        return end + 1


def _check_structure(g: _Grammar) -> None:
    for name, pos in g.referenced.items():
        if name not in g.rules:
            raise GrammarProblem(f"rule {name!r} is used but not defined", pos)
    if "root" not in g.rules:
        raise GrammarProblem("the grammar has no root rule")
    depth = _Depth(g.rules)
    for name in g.rules:
        depth.of(name, 0)
    _Expansion(g.rules).check()


class _Depth:
    """The longest chain of rules referring to rules (groups included), recursion not followed. ``level``
    counts the references from where the walk started; ``below`` the rules of the longest chain below."""

    def __init__(self, rules: dict[str, list[list[Symbol]]]) -> None:
        self.rules = rules
        self.below: dict[str, int] = {}  # rule -> the longest chain from it (memo)
        self.active: set[str] = set()

    def of(self, name: str, level: int) -> int:
        if name in self.active:
            return 0  # recursion
        if name in self.below:
            chain = self.below[name]
        else:
            if level > MAX_GRAMMAR_DEPTH:
                raise GrammarProblem(f"rules refer to rules more than {MAX_GRAMMAR_DEPTH} levels deep")
            self.active.add(name)
            chain = 1 + max(
                (self.of(ref, level + 1) for alt in self.rules[name] for sym in alt for ref in _refs(sym)), default=0
            )
            self.active.discard(name)
            self.below[name] = chain
        if level + chain - 1 > MAX_GRAMMAR_DEPTH:  # chain - 1 references below this rule
            raise GrammarProblem(f"rules refer to rules more than {MAX_GRAMMAR_DEPTH} levels deep")
        return chain


def _refs(symbol: Symbol) -> list[str]:
    while symbol[0] == "rep":
        symbol = symbol[1]
    return [symbol[1]] if symbol[0] == "r" else []


class _Expansion:
    """How many parse stacks expanding one rule can open (its leftmost derivations), and left recursion.

    Both are llama.cpp's concern at every step of generation: it expands the symbol at each stack's top
    into every way to reach a terminal. A rule with k alternatives each starting with a rule of k
    alternatives opens k*k stacks, and so on down the chain."""

    def __init__(self, rules: dict[str, list[list[Symbol]]]) -> None:
        self.rules = rules
        self.nullable = self._nullable()
        self.count: dict[str, int] = {}
        self.active: list[str] = []

    def check(self) -> None:
        for name in self.rules:
            if self.of(name) > MAX_GRAMMAR_EXPANSION:
                shown = f"rule {name!r}" if not name.startswith("(") else "a group"
                raise GrammarProblem(
                    f"{shown} is ambiguous enough to open more than {MAX_GRAMMAR_EXPANSION} parse stacks at once"
                )

    def _nullable(self) -> set[str]:
        nullable: set[str] = set()
        changed = True
        while changed:
            changed = False
            for name, alternatives in self.rules.items():
                if name not in nullable and any(
                    all(self._sym_nullable(s, nullable) for s in alt) for alt in alternatives
                ):
                    nullable.add(name)
                    changed = True
        return nullable

    def _sym_nullable(self, symbol: Symbol, nullable: set[str]) -> bool:
        if symbol[0] == "t":
            return False
        if symbol[0] == "r":
            return symbol[1] in nullable
        return symbol[2] == 0 or self._sym_nullable(symbol[1], nullable)

    def of(self, name: str) -> int:
        if name in self.count:
            return self.count[name]
        if name in self.active:
            cycle = self.active[self.active.index(name) :]
            shown = [n for n in cycle if not n.startswith("(")] or ["a group"]
            raise GrammarProblem(f"left recursion through rule {shown[0]!r}: llama.cpp cannot use it")
        self.active.append(name)
        total = 0
        for alt in self.rules[name]:
            total += self._sequence(alt)
            if total > MAX_GRAMMAR_EXPANSION:
                break
        self.active.pop()
        self.count[name] = total = min(total, MAX_GRAMMAR_EXPANSION + 1)
        return total

    def _sequence(self, alt: list[Symbol]) -> int:
        total = 0
        for symbol in alt:
            total += self._symbol(symbol)
            if not self._sym_nullable(symbol, self.nullable) or total > MAX_GRAMMAR_EXPANSION:
                return total
        return total + 1  # the whole alternative can be empty: the stack pops to what follows

    def _symbol(self, symbol: Symbol) -> int:
        if symbol[0] == "t":
            return 1
        if symbol[0] == "r":
            return self.of(symbol[1])
        if symbol[3] is None and self._sym_nullable(symbol[1], self.nullable):
            # x* is S ::= x S | (empty): with an x that can be empty, S is left-recursive
            raise GrammarProblem("an unbounded repetition of something that can be empty is left recursion")
        return self._symbol(symbol[1])
