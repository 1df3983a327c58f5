"""Stop sequences and UTF-8 across token boundaries, as the engines that stream text themselves use them."""

from __future__ import annotations

from lllmsd.core.jobs import TokenLogprob
from lllmsd.engines.textstream import TextStream, partial_stop


def feed(stream: TextStream, text: str) -> str:
    stream.feed(text.encode())
    return stream.release()[0]


def test_text_that_may_start_a_stop_sequence_is_held_back() -> None:
    stream = TextStream(["END", "xy"])
    assert feed(stream, "abcE") == "abc"  # "E" may start "END"
    assert feed(stream, "N") == ""
    assert feed(stream, "o") == "ENo"  # it did not
    assert feed(stream, " x") == " "
    assert feed(stream, "y more") == ""  # "xy": cut there, nothing of it shown
    assert stream.stopped
    assert stream.emitted == "abcENo "
    assert stream.flush() == ("", ())


def test_held_back_text_comes_out_when_generation_ends() -> None:
    stream = TextStream(["STOP"])
    assert feed(stream, "fine ST") == "fine "
    assert stream.flush()[0] == "ST"
    assert not stream.stopped


def test_a_character_split_across_tokens_is_decoded_whole() -> None:
    stream = TextStream([])
    euro = "€".encode()
    stream.feed(euro[:1])
    assert stream.release()[0] == ""
    stream.feed(euro[1:])
    assert stream.release()[0] == "€"


def test_logprobs_travel_with_their_text_and_get_offsets() -> None:
    stream = TextStream(["!"], offset=10)
    stream.feed(b"Hi", TokenLogprob("Hi", -0.1))
    stream.feed(b" there", TokenLogprob(" there", -0.2))
    text, logprobs = stream.release()
    assert text == "Hi there"
    assert [(lp.token, lp.text_offset) for lp in logprobs] == [("Hi", 10), (" there", 12)]
    stream.feed(b"!", TokenLogprob("!", -0.3))
    assert stream.release() == ("", ())
    assert stream.stopped


def test_partial_stop_is_the_longest_growable_end() -> None:
    assert partial_stop("abc<|im", ["<|im_end|>", "c<"]) == 4
    assert partial_stop("abc", ["xyz"]) == 0
    assert partial_stop("ab", ["b"]) == 0  # a whole stop is a hit, not a partial one
