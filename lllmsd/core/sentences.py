"""Text to speak, split into sentences, none longer than a bound.

Speech engines synthesize a sentence at a time, and lllmsd streams each sentence's audio as soon as it
exists, so the split decides how soon a client hears the first words. It is also a memory bound: Piper
needs memory in proportion to the length of what it is given at once (a 144-word sentence with no full
stop took 1 GB; 200 characters about 350 MB), so a sentence longer than ``MAX_SENTENCE_CHARS`` is cut at
its last clause mark (, ; : and dashes) before the bound, else at its last space, else at the bound.

Boundaries: . ! ? and … (with any closing quotes or brackets) followed by white space, the CJK marks
。！？ wherever they are, and line breaks (a list item or a heading is a sentence of its own). A full
stop after a common abbreviation (Mr., e.g., etc.) or a single letter (J. R. R. Tolkien) ends nothing.
Pieces without a letter or a digit ("...", "—") are dropped: there is nothing in them to say.
"""

from __future__ import annotations

import re

MAX_SENTENCE_CHARS = 200

_END = re.compile(r"""[.!?…]+["'”’)\]]*(?=\s)|[。！？]+["'”’)\]」』]*|\n+""")
_ABBREVIATIONS = frozenset(
    {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "etc", "e.g", "i.e", "cf", "approx", "fig"}
    | {"vol", "inc", "ltd", "corp", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov"}
    | {"dec"}
)
_CLAUSE = re.compile(r"(?<=[,;:—–])\s|\s(?=[-—–]\s)")  # the space after a clause mark, or before a dash
_SPEAKABLE = re.compile(r"\w")


def split_sentences(text: str, max_chars: int = MAX_SENTENCE_CHARS) -> list[str]:
    """``text`` as the sentences to synthesize one after another, each at most ``max_chars`` long."""
    pieces: list[str] = []
    for sentence in _sentences(text):
        pieces += _bounded(sentence, max_chars)
    return [p for p in pieces if _SPEAKABLE.search(p)]


def _sentences(text: str) -> list[str]:
    found: list[str] = []
    start = 0
    for match in _END.finditer(text):
        if match.group().startswith(".") and _after_abbreviation(text, match.start()):
            continue
        found.append(text[start : match.end()])
        start = match.end()
    found.append(text[start:])
    return [" ".join(s.split()) for s in found if s.strip()]


def _after_abbreviation(text: str, dot: int) -> bool:
    """Whether the full stop at ``dot`` ends an abbreviation or an initial, not a sentence."""
    word = text[:dot].rsplit(None, 1)[-1] if text[:dot].strip() else ""
    word = word.lstrip("\"'“‘([").lower()
    return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def _bounded(sentence: str, max_chars: int) -> list[str]:
    pieces: list[str] = []
    rest = sentence
    while len(rest) > max_chars:
        cut = _cut_point(rest, max_chars)
        pieces.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        pieces.append(rest)
    return pieces


def _cut_point(text: str, max_chars: int) -> int:
    """Where to cut ``text`` (longer than ``max_chars``): after its last clause mark within the bound,
    else at its last space, else at the bound itself (one very long word)."""
    window = text[: max_chars + 1]
    clauses = [m.start() for m in _CLAUSE.finditer(window) if m.start() <= max_chars]
    if clauses and clauses[-1] > max_chars // 4:  # a cut near the start would leave the rest as long
        return clauses[-1]
    space = window.rfind(" ")
    if space > 0:
        return space
    return max_chars
