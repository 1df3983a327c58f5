"""Synthesized speech encoded in OpenAI's response formats, in-process with PyAV (no ffmpeg binary).

| format | container, codec           | rate            | streams?                                        |
|--------|----------------------------|-----------------|-------------------------------------------------|
| mp3    | MPEG audio, libmp3lame     | the voice's     | yes: frame by frame                             |
| opus   | Ogg, libopus               | 24 kHz          | yes: an Ogg page every ``OGG_PAGE_SECONDS``     |
| aac    | ADTS, FFmpeg's aac         | the voice's     | yes: frame by frame                             |
| flac   | native FLAC                | the voice's     | yes: the header says "length unknown" (allowed) |
| wav    | RIFF, 16-bit PCM           | the voice's     | no: sizes in the header, so sent whole at the end |
| pcm    | none, 16-bit little-endian | 24 kHz (OpenAI) | yes                                             |

Opus takes 8, 12, 16, 24 or 48 kHz only, and OpenAI documents ``pcm`` as 24 kHz, so those two are
resampled. A streaming format's muxer writes into a sink that cannot seek, and ``encode`` hands back
whatever it wrote for the samples given: a codec keeps back a frame or so (its lookahead), which comes
with the next call or ``finish``. A WAV header holds the data size, which is known only at the end: rather
than send a header that lies (0xFFFFFFFF), wav is written to a seekable buffer and sent whole by ``finish``.

Not thread-safe: one encoder per job, on the thread that runs the job.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np

OGG_PAGE_SECONDS = 0.1  # an Ogg page is sent once it holds this much audio (FFmpeg's default is 1 s)
MP3_BITRATE = 64_000  # mono speech; LAME's default (128 kbit/s) is twice what a voice needs


@dataclass(frozen=True)
class AudioFormat:
    container: str
    codec: str
    rate: int | None = None  # None: the voice's own rate
    streams: bool = True
    codec_options: tuple[tuple[str, str], ...] = ()
    container_options: tuple[tuple[str, str], ...] = ()


FORMATS: dict[str, AudioFormat] = {
    "mp3": AudioFormat("mp3", "libmp3lame", codec_options=(("b", str(MP3_BITRATE)),)),
    "opus": AudioFormat(
        "ogg", "libopus", rate=24_000, container_options=(("page_duration", str(int(OGG_PAGE_SECONDS * 1e6))),)
    ),
    "aac": AudioFormat("adts", "aac"),
    "flac": AudioFormat("flac", "flac"),
    "wav": AudioFormat("wav", "pcm_s16le", streams=False),
    "pcm": AudioFormat("s16le", "pcm_s16le", rate=24_000),
}


class _Sink:
    """A write-only file for the muxer: what it writes is taken after each step. Having no ``seek``, it
    tells FFmpeg the output streams, so nothing is ever rewritten after it was sent."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: Any) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


class SpeechEncoder:
    """Encodes 16-bit mono samples at ``sample_rate`` into one file of ``response_format``, piece by piece."""

    def __init__(self, response_format: str, sample_rate: int) -> None:
        self.format = FORMATS[response_format]
        self.sample_rate = sample_rate
        self._sink = _Sink()
        self._buffer = io.BytesIO()  # a format sent whole: a seekable file, so its header is true
        self._container: Any = av.open(
            self._sink if self.format.streams else self._buffer,
            mode="w",
            format=self.format.container,
            options=dict(self.format.container_options),
        )
        rate = self.format.rate or sample_rate
        self._stream = self._container.add_stream(
            self.format.codec, rate=rate, layout="mono", options=dict(self.format.codec_options)
        )
        codec = self._stream.codec_context
        self._resampler = av.AudioResampler(
            format=codec.codec.audio_formats[0].name,  # the codec's preferred sample format
            layout="mono",
            rate=rate,
            frame_size=codec.frame_size or None,  # codecs with fixed frames (mp3, aac, opus) get whole ones
        )
        self._samples_in = 0
        self._finished = False

    def encode(self, samples: np.ndarray) -> bytes:
        """The bytes of the file that are ready once ``samples`` (int16) are encoded."""
        if samples.size:
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(samples, dtype=np.int16).reshape(1, -1), format="s16", layout="mono"
            )
            frame.sample_rate = self.sample_rate
            frame.pts = self._samples_in
            frame.time_base = Fraction(1, self.sample_rate)
            self._samples_in += samples.size
            self._mux(self._resampler.resample(frame))
        return self._sink.take()

    def finish(self) -> bytes:
        """The rest of the file: what the resampler and the codec held back, and the trailer (or, for a
        format sent whole, the whole file)."""
        self._mux(self._resampler.resample(None))
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        self._finished = True
        return self._sink.take() if self.format.streams else self._buffer.getvalue()

    def close(self) -> None:
        """Free the codec and the container (after ``finish``, or instead of it when the job stops early)."""
        if not self._finished:
            self._finished = True
            # closing a half-written file may complain: it is being discarded anyway
            with contextlib.suppress(Exception):
                self._container.close()

    def _mux(self, frames: list[Any]) -> None:
        for frame in frames:
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
