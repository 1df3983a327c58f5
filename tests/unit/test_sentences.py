"""Splitting text to speak into sentences, none longer than the bound (core/sentences.py)."""

from __future__ import annotations

import pytest

from lllmsd.core.sentences import MAX_SENTENCE_CHARS, split_sentences


def test_sentence_ends_with_their_closing_quotes() -> None:
    text = 'Hello there. "Stop!" she said. Did it work? Yes… it did.'
    assert split_sentences(text) == ["Hello there.", '"Stop!"', "she said.", "Did it work?", "Yes…", "it did."]


def test_abbreviations_initials_and_decimals_end_nothing() -> None:
    text = "Mr. Smith met Dr. Jones, e.g. at 3.50 on Jan. 5. J. R. R. Tolkien wrote books. The end."
    assert split_sentences(text) == [
        "Mr. Smith met Dr. Jones, e.g. at 3.50 on Jan. 5.",
        "J. R. R. Tolkien wrote books.",
        "The end.",
    ]


def test_line_breaks_and_cjk_marks_are_boundaries() -> None:
    assert split_sentences("A heading\n\n- one item\n- two items\n你好。再见！") == [
        "A heading",
        "- one item",
        "- two items",
        "你好。",
        "再见！",
    ]


def test_white_space_is_collapsed_and_unspeakable_pieces_are_dropped() -> None:
    assert split_sentences("  Lots   of\tspace .  ...  — !!! Then words. ") == ["Lots of space .", "Then words."]
    assert split_sentences(" ... — !!! ") == []


def test_a_long_sentence_is_cut_at_its_last_clause_mark_within_the_bound() -> None:
    clause = "a clause that goes on for a while"  # 33 characters
    text = ", ".join([clause] * 12) + "."
    pieces = split_sentences(text, max_chars=100)
    assert all(len(p) <= 100 for p in pieces)
    assert all(p.endswith((",", ".")) for p in pieces)  # cut after commas, never inside a clause
    assert " ".join(pieces) == text


def test_without_punctuation_it_is_cut_at_spaces_and_a_huge_word_at_the_bound() -> None:
    words = " ".join(["word"] * 144)
    pieces = split_sentences(words)
    assert all(len(p) <= MAX_SENTENCE_CHARS for p in pieces)
    assert " ".join(pieces) == words
    assert split_sentences("x" * 450) == ["x" * 200, "x" * 200, "x" * 50]


@pytest.mark.parametrize("bound", [20, 80, 200])
def test_nothing_is_lost_or_reordered(bound: int) -> None:
    text = (
        "The quick brown fox jumps over the lazy dog; it runs away — far away — into the forest, where "
        "nobody sees it again. Then: silence! Was that all? " * 3
    )
    pieces = split_sentences(text, max_chars=bound)
    assert all(len(p) <= bound for p in pieces)
    assert " ".join(pieces).split() == text.split()
