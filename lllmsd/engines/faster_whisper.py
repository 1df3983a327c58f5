"""Speech to text on faster-whisper (CTranslate2 Whisper models).

One engine object holds one ``WhisperModel``. Everything here runs on the instance's worker thread:
the uploaded bytes are decoded by PyAV inside ``transcribe``, so a long mp3 never blocks the event loop.

A model folder is opened as a local path; faster-whisper only reaches the Hugging Face hub when given
a size name ("tiny") or a repository id, which this engine never passes (``local_files_only`` guards
the one code path that could).

Memory is bounded by a window, not by the file (docs/transcription.md). faster-whisper's own
``transcribe`` decodes a whole upload and computes the log-Mel features of all of it at once: about
3.3 GB for an hour, whatever the file's size (an hour of silent FLAC is 96 KB). So the upload is
decoded twice:

1. ``measure``: decoded and counted, keeping nothing. That gives the exact duration for the first event,
   enforces ``max_audio_seconds`` (refused from the container's declared duration when it is already
   over, else as soon as the decoded audio passes it), and finds undecodable files before any work.
2. ``AudioStream``: decoded again as 16 kHz mono float32, lazily, and handed to
   ``WhisperModel.transcribe`` ``WINDOW_SECONDS`` at a time (ten of Whisper's own 30 s windows; a
   remainder under 30 s joins the last window, so a file up to 330 s is one call, as before). Segment,
   word and ``seek`` timestamps move by the window's offset and ids count across windows. The language
   detected on the first window is used for the others, and each window gets the text before it as its
   prompt (the user's prompt for the first), as faster-whisper does between its 30 s windows. A window
   cuts the audio where it ends, perhaps inside a word: the segment that runs up to the cut is dropped
   and the next window starts where that segment started, so it is heard whole.

Cancellation: faster-whisper decodes 30-second windows and yields one segment at a time; ``cancel``
is checked between segments (and between decoded frames while measuring), so a client that goes away
frees the instance within one window.
"""

from __future__ import annotations

import gc
import io
import itertools
import logging
import math
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import _LANGUAGE_CODES

from lllmsd.config import FasterWhisperModelConfig
from lllmsd.core.jobs import (
    Feature,
    Job,
    TranscriptInfo,
    TranscriptionEvent,
    TranscriptionJob,
    TranscriptSegment,
    TranscriptWord,
)
from lllmsd.engines.base import ModelFiles, TranscriptionEngine
from lllmsd.errors import InvalidRequest, ModelUnavailable

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
HOP = 160  # samples per 10 ms log-Mel frame
FRAMES_PER_SECOND = SAMPLE_RATE // HOP
CHUNK_SECONDS = 30  # Whisper's own window
# Audio handed to faster-whisper per call, a multiple of CHUNK_SECONDS. Its features cost about 250 MB
# while they are computed (docs/transcription.md); tests lower it to cross a window boundary cheaply.
WINDOW_SECONDS = 300
# A window's last segment ending this close to the cut is decoded again at the head of the next window.
HOLDBACK_SECONDS = 5.0
PROMPT_RESET_TEMPERATURE = 0.5  # faster-whisper's prompt_reset_on_temperature
CONTEXT_TOKENS = 223  # the previous text faster-whisper prompts with: max_length // 2 - 1 tokens
DECODE_GROUP = 500_000  # source samples resampled at once, as faster-whisper's decode_audio
# OpenAI: "If set to 0, the model will use log probability to automatically increase the temperature
# until certain thresholds are hit" -- Whisper's own fallback schedule.
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
LANGUAGE_CODES = frozenset(_LANGUAGE_CODES)


class FasterWhisperEngine(TranscriptionEngine):
    name = "faster-whisper"
    features = frozenset({Feature.TRANSLATION, Feature.WORD_TIMESTAMPS})

    def __init__(self, config: FasterWhisperModelConfig, files: ModelFiles) -> None:
        super().__init__(config, files)
        if files.path is None or not Path(files.path).is_dir():
            raise ModelUnavailable(f"faster-whisper needs a CTranslate2 model folder, got {files.path}")
        self.path = Path(files.path)
        self.model: Any = self._load_model()
        self.multilingual = bool(self.model.model.is_multilingual)

    def _load_model(self) -> Any:
        """The WhisperModel for ``self.path`` (a separate step so tests can share one loaded model)."""
        device = self.config.device.type
        try:
            return WhisperModel(
                str(self.path),
                device=device,
                device_index=self.config.device_index,
                compute_type=self.config.compute_type,
                cpu_threads=self.config.device.threads or 0,  # 0 = CTranslate2 picks
                local_files_only=True,
            )
        except (RuntimeError, ValueError) as exc:
            if device == "cpu":
                raise
            # no CUDA driver, no such GPU, a compute type the device cannot do: the config's fault
            raise ModelUnavailable(f"faster-whisper cannot use device {device!r}: {exc}") from exc

    def placement(self, _: object = None) -> dict[str, Any]:
        model = self.model.model  # the ctranslate2 Whisper: what CTranslate2 resolved auto to
        return {
            "backend": "ctranslate2",
            "device": model.device,
            "device_index": list(model.device_index),
            "compute_type": model.compute_type,
        }

    @classmethod
    def config_warnings(cls, config: FasterWhisperModelConfig) -> list[tuple[str, str]]:
        import ctranslate2

        if config.device.type == "cuda" and ctranslate2.get_cuda_device_count() == 0:
            return [("device", "cuda asked, but CTranslate2 sees no CUDA device here: loading will fail (503)")]
        return []

    @classmethod
    def check_job(cls, config: FasterWhisperModelConfig, job: Job) -> None:
        if isinstance(job, TranscriptionJob) and job.language is not None and job.language not in LANGUAGE_CODES:
            raise InvalidRequest(
                f"language '{job.language}' is not one Whisper knows; use an ISO-639-1 code such as 'en' or 'fr'",
                param="language",
            )

    def close(self) -> None:
        self.model = None

    # --------------------------------------------------------------------------------- transcription

    def transcribe(self, job: TranscriptionJob, cancel: threading.Event) -> Iterator[TranscriptionEvent]:
        self._check_model_can(job)
        # pass 1: the duration, and the limit, before any work (nothing is kept but a count)
        duration = measure(job.audio, job.filename, float(self.config.max_audio_seconds), cancel)
        if cancel.is_set():
            return
        # pass 2: decode again, window by window, and transcribe each window as it is complete
        audio = AudioStream(job.audio, job.filename)
        try:
            yield from self._windows(job, audio, duration, cancel)
        finally:
            audio.close()

    def _windows(
        self, job: TranscriptionJob, audio: AudioStream, duration: float, cancel: threading.Event
    ) -> Iterator[TranscriptionEvent]:
        """Transcribe ``WINDOW_SECONDS`` at a time (see the module docstring), as one transcript."""
        window_samples = WINDOW_SECONDS * SAMPLE_RATE
        slack = CHUNK_SECONDS * SAMPLE_RATE  # a remainder shorter than one Whisper window joins the last one
        transcript = _Transcript(duration)
        language = job.language
        context: list[int] | None = None  # the text before the window, as tokens; None: the user's prompt
        start = 0  # sample where the window begins (always a whole mel frame)
        while True:
            samples, last = audio.window(start, window_samples, slack)
            if samples.size == 0:  # not after the first window: every later one has at least ``slack``
                if context is None:
                    raise InvalidRequest(f"'{job.filename}' contains no audio", param="file")
                return
            offset, length = start / SAMPLE_RATE, samples.size / SAMPLE_RATE
            segments, info = self.model.transcribe(
                samples,
                language=language,
                task="translate" if job.translate else "transcribe",
                beam_size=self.config.beam_size,
                temperature=_temperatures(job.temperature),
                initial_prompt=(job.prompt or None) if context is None else (list(context) or None),
                word_timestamps=job.word_timestamps,
                vad_filter=self.config.vad_filter,
            )
            if context is None:  # the first window
                yield TranscriptInfo(language=str(info.language), duration=duration)
                context = transcript.context = self._prompt_tokens(job.prompt)
            language = str(info.language)  # detected on the first window, kept for the others
            held: Any = None  # a window that cuts the audio holds its latest segment back (below)
            # ``segments`` is lazy: each next() decodes one more 30 s window, so this loop is where the
            # time goes
            for decoded in segments:
                if cancel.is_set():
                    return
                ready, held = (decoded, None) if last else (held, decoded)
                if ready is not None:
                    yield transcript.take(ready, offset, length)
            if cancel.is_set() or last:
                return
            end = start + samples.size
            if held is not None:
                held_start = min(max(float(held.start), 0.0), length)
                # The window cut the audio: a segment that runs up to the cut may have lost its last
                # words. Drop it and start the next window where it starts (if that still moves on by
                # half a window), with the text before it as the context.
                if float(held.end) >= length - HOLDBACK_SECONDS and held_start >= length / 2:
                    end = start + _frame_ceil(held_start)
                else:
                    yield transcript.take(held, offset, length)
            start = max(end, _frame_ceil(transcript.latest))

    def _prompt_tokens(self, prompt: str | None) -> list[int]:
        """The user's prompt as the tokens faster-whisper puts before the first window's text."""
        if not prompt:
            return []
        return list(self.model.hf_tokenizer.encode(" " + prompt.strip(), add_special_tokens=False).ids)

    def _check_model_can(self, job: TranscriptionJob) -> None:
        """Refuse what an English-only model would silently get wrong (faster-whisper only logs it)."""
        if self.multilingual:
            return
        if job.translate:
            raise InvalidRequest(
                "this model is English-only and cannot translate; use a multilingual Whisper model",
                param="model",
            )
        if job.language is not None and job.language != "en":
            raise InvalidRequest(
                f"this model is English-only and cannot transcribe language '{job.language}'",
                param="language",
            )


# ------------------------------------------------------------------------------------------ decoding


def measure(data: bytes, filename: str, limit: float, cancel: threading.Event | None = None) -> float:
    """Seconds of audio in the upload, decoded and counted without keeping a sample; a 400 naming the file
    when it cannot be decoded, holds no audio, or is longer than ``limit`` (max_audio_seconds): refused
    from the container's declared duration when it has one, else as soon as the decoded audio passes it."""
    seconds = 0.0
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            declared = declared_seconds(container)
            if declared is not None and declared > limit:
                raise _too_long(filename, limit)
            for frame in audio_frames(container):
                if frame.sample_rate:
                    seconds += frame.samples / frame.sample_rate
                if seconds > limit:
                    raise _too_long(filename, limit)
                if cancel is not None and cancel.is_set():
                    break
    except InvalidRequest:
        raise
    except Exception as exc:  # PyAV raises many kinds (InvalidDataError, ValueError, IndexError...)
        raise _undecodable(filename, exc) from None
    if seconds == 0 and not (cancel is not None and cancel.is_set()):
        raise InvalidRequest(f"'{filename}' contains no audio", param="file")
    return seconds


def declared_seconds(container: Any) -> float | None:
    """The duration the container declares for its audio (a header field, or FFmpeg's estimate), if any."""
    streams = container.streams.audio
    if streams and streams[0].duration is not None and streams[0].time_base:
        return float(streams[0].duration * streams[0].time_base)
    if container.duration is not None:
        return float(container.duration / av.time_base)
    return None


def audio_frames(container: Any) -> Iterator[Any]:
    """The first audio stream's frames, skipping the ones FFmpeg finds corrupt (as ``decode_audio`` does)."""
    frames = container.decode(audio=0)
    while True:
        try:
            yield next(frames)
        except StopIteration:
            return
        except av.error.InvalidDataError:
            continue


def decoded_samples(data: bytes) -> Iterator[np.ndarray]:
    """The upload as 16 kHz mono float32 pieces (about ten seconds each), decoded lazily: faster-whisper's
    ``decode_audio`` (s16 resampling, then scaled to float) without keeping the whole file."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    fifo = av.AudioFifo()
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            for frame in itertools.chain(_grouped(audio_frames(container), fifo), [None]):
                for resampled in resampler.resample(frame):  # None flushes the resampler
                    yield resampled.to_ndarray().reshape(-1).astype(np.float32) / 32768.0
    finally:
        # PyAV's resampler holds memory until a collection runs (faster-whisper issue 390)
        del resampler, fifo
        gc.collect()


def _grouped(frames: Iterator[Any], fifo: Any) -> Iterator[Any]:
    for frame in frames:
        frame.pts = None  # resample by count, ignoring timestamp gaps
        fifo.write(frame)
        if fifo.samples >= DECODE_GROUP:
            yield fifo.read()
    if fifo.samples > 0:
        yield fifo.read()


class AudioStream:
    """The upload decoded a second time, as windows: only the samples from the current window on are
    kept, so memory is one window whatever the length of the file."""

    def __init__(self, data: bytes, filename: str) -> None:
        self.filename = filename
        self._pieces = decoded_samples(data)
        self._buffer = np.zeros(0, dtype=np.float32)
        self._offset = 0  # the sample index of _buffer[0]
        self._ended = False

    def window(self, start: int, length: int, slack: int) -> tuple[np.ndarray, bool]:
        """Samples ``start`` to ``start + length``, or to the end of the audio when no more than
        ``length + slack`` remain; and whether this is the last window. ``start`` never goes back."""
        kept = self._buffer[start - self._offset :]
        pieces, have = [kept], kept.size
        while not self._ended and have <= length + slack:
            try:
                piece = next(self._pieces)
            except StopIteration:
                self._ended = True
            except Exception as exc:  # the same bytes decoded once already; kept for safety
                raise _undecodable(self.filename, exc) from None
            else:
                pieces.append(piece)
                have += piece.size
        self._buffer = np.concatenate(pieces) if len(pieces) > 1 else kept
        self._offset = start
        last = self._ended and self._buffer.size <= length + slack
        return (self._buffer if last else self._buffer[:length]), last

    def close(self) -> None:
        self._pieces.close()  # closes the container and frees the resampler
        self._buffer = np.zeros(0, dtype=np.float32)


def _too_long(filename: str, limit: float) -> InvalidRequest:
    return InvalidRequest(
        f"'{filename}' is longer than the {limit:.10g}-second limit of this model (max_audio_seconds)", param="file"
    )


def _undecodable(filename: str, exc: Exception) -> InvalidRequest:
    return InvalidRequest(
        f"could not decode '{filename}' as audio ({type(exc).__name__}: {exc}); send wav, mp3, ogg, flac, webm or m4a",
        param="file",
    )


# --------------------------------------------------------------------------------------- the segments


def _temperatures(requested: float | None) -> Iterable[float]:
    if not requested:
        return FALLBACK_TEMPERATURES
    return (float(requested),)


class _Transcript:
    """The transcript across windows: segment ids, the latest timestamp given out (no window starts
    before it), and the text the next window is prompted with."""

    def __init__(self, duration: float) -> None:
        self.duration = duration
        self.index = 0
        self.latest = 0.0
        self.context: list[int] = []

    def take(self, segment: Any, offset: float, length: float) -> TranscriptSegment:
        """A faster-whisper segment of the window at ``offset`` (``length`` seconds) as the next segment."""
        event = _segment(self.index, segment, offset, length, self.duration)
        self.index += 1
        ends = [float(segment.end), *(float(w.end) for w in segment.words or ())]
        self.latest = max(self.latest, offset + min(max(*ends, 0.0), length))
        # faster-whisper's own carrying between its 30 s windows: the previous text, forgotten after a
        # window that needed a high temperature
        if segment.temperature is not None and segment.temperature > PROMPT_RESET_TEMPERATURE:
            self.context.clear()
        else:
            self.context.extend(int(t) for t in segment.tokens)
        del self.context[:-CONTEXT_TOKENS]
        return event


def _frame_ceil(seconds: float) -> int:
    """``seconds`` as a sample index, rounded up to a whole 10 ms mel frame (so ``seek`` shifts exactly)."""
    return math.ceil(round(seconds * FRAMES_PER_SECOND, 6)) * HOP


def _segment(index: int, segment: Any, offset: float, length: float, duration: float) -> TranscriptSegment:
    """One faster-whisper segment of the window that starts at ``offset`` and lasts ``length`` seconds."""

    # Whisper's timestamps are token positions in a 30 s window: clamp them to the window's audio, then
    # to the whole audio once moved to the window's place in it.
    def at(value: Any) -> float:
        return round(min(offset + min(max(float(value), 0.0), length), duration), 3)

    words = tuple(
        TranscriptWord(start=at(w.start), end=at(w.end), word=str(w.word), probability=float(w.probability))
        for w in segment.words or ()
    )
    return TranscriptSegment(
        id=index,  # faster-whisper counts from 1 in each window, OpenAI from 0 over the whole audio
        seek=int(segment.seek) + round(offset * FRAMES_PER_SECOND),
        start=at(segment.start),
        end=at(segment.end),
        text=str(segment.text),
        words=words,
        avg_logprob=float(segment.avg_logprob),
        no_speech_prob=float(segment.no_speech_prob),
        compression_ratio=float(segment.compression_ratio),
        temperature=float(segment.temperature) if segment.temperature is not None else None,
        tokens=tuple(int(t) for t in segment.tokens),
    )
