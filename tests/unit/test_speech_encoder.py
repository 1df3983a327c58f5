"""Encoding synthesized samples in every OpenAI response format with PyAV (engines/speech_encoder.py):
each file decodes back to the samples' length, streaming formats give bytes as samples come in, and wav
(whose header holds its size) only at the end, with a true header."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from lllmsd.engines.speech_encoder import SpeechEncoder
from tests.speech import PCM_RATE, decoded_seconds

RATE = 22050
STREAMING = ["mp3", "opus", "aac", "flac", "pcm"]


def tone(seconds: float, frequency: float = 220.0) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    return (np.sin(2 * np.pi * frequency * t) * 12000).astype(np.int16)


def encode(response_format: str, pieces: list[np.ndarray]) -> tuple[list[bytes], bytes]:
    encoder = SpeechEncoder(response_format, RATE)
    try:
        parts = [encoder.encode(piece) for piece in pieces]
        return parts, encoder.finish()
    finally:
        encoder.close()


@pytest.mark.parametrize("response_format", [*STREAMING, "wav"])
def test_each_format_decodes_to_the_length_encoded(response_format: str) -> None:
    parts, tail = encode(response_format, [tone(1.0), tone(0.5, 330), tone(1.5, 440)])
    seconds, rate = decoded_seconds(b"".join(parts) + tail, response_format)
    assert seconds == pytest.approx(3.0, abs=0.1)  # codecs pad a frame or two at the ends (AAC: 2,048 samples)
    assert rate == {"opus": 48000, "pcm": PCM_RATE}.get(response_format, RATE)  # Opus decodes at 48 kHz


@pytest.mark.parametrize("response_format", STREAMING)
def test_streaming_formats_give_most_of_each_piece_as_it_comes(response_format: str) -> None:
    parts, _ = encode(response_format, [tone(1.0), tone(1.0, 330)])
    assert all(parts)
    # what came out after the first second, decoded alone, is most of that second
    if response_format in ("mp3", "aac", "pcm"):  # self-delimiting frames: the first part decodes alone
        assert decoded_seconds(parts[0], response_format)[0] > 0.8


def test_pcm_is_raw_24_khz_samples() -> None:
    parts, tail = encode("pcm", [tone(1.0)])
    data = b"".join(parts) + tail
    assert len(data) == pytest.approx(2 * PCM_RATE, rel=0.01)


def test_wav_is_sent_whole_at_the_end_with_true_sizes() -> None:
    parts, tail = encode("wav", [tone(1.0), tone(1.0, 330)])
    assert parts == [b"", b""]
    assert tail[:4] == b"RIFF"
    (riff_size,) = struct.unpack("<I", tail[4:8])
    assert riff_size == len(tail) - 8  # not the 0xFFFFFFFF of a streamed header
    assert decoded_seconds(tail, "wav")[0] == pytest.approx(2.0, abs=0.001)


def test_an_encoder_closed_early_frees_itself_without_error() -> None:
    encoder = SpeechEncoder("mp3", RATE)
    assert encoder.encode(tone(0.5))
    encoder.close()
    encoder.close()
