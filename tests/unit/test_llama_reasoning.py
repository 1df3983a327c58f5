"""A thinking model's <think> text split from its answer, whole and cut at every character (pure logic)."""

from __future__ import annotations

import itertools

import pytest

from lllmsd.engines.llama_cpp.reasoning import ReasoningSplit


def split(text: str, cut: list[int], *, inside: bool = False) -> tuple[str, str]:
    splitter = ReasoningSplit(inside=inside)
    reasoning = content = ""
    bounds = [0, *cut, len(text)]
    for start, end in itertools.pairwise(bounds):
        r, c = splitter.feed(text[start:end])
        reasoning, content = reasoning + r, content + c
    r, c = splitter.flush()
    return reasoning + r, content + c


def every_cut(text: str) -> list[list[int]]:
    return [[], list(range(1, len(text)))] + [[i] for i in range(1, len(text))]


CASES = [
    # (generated text, prompt opened <think>, reasoning, content)
    ("<think>\nParis is in France.\n</think>\n\nIt is sunny.", False, "\nParis is in France.\n", "It is sunny."),
    ("  <think>a < b </thin k></think>x", False, "a < b </thin k>", "x"),
    ("Plain answer with <think> later.", False, "", "Plain answer with <think> later."),
    ("<thin", False, "", "<thin"),  # not the tag after all: text
    ("just reasoning\n</think>\n\nanswer", True, "just reasoning\n", "answer"),
    ("<think>cut off by max_tokens", False, "cut off by max_tokens", ""),
    ("<think></think>", False, "", ""),
    ("", True, "", ""),
]


@pytest.mark.parametrize(("text", "inside", "reasoning", "content"), CASES)
def test_reasoning_and_content_whatever_the_cuts(text: str, inside: bool, reasoning: str, content: str) -> None:
    for cut in every_cut(text):
        assert split(text, cut, inside=inside) == (reasoning, content), cut


def test_no_tag_ever_reaches_either_side_while_streaming() -> None:
    text = "<think>step one</think>The answer."
    splitter = ReasoningSplit()
    for char in text:
        reasoning, content = splitter.feed(char)
        assert "<" not in reasoning
        assert "<" not in content
