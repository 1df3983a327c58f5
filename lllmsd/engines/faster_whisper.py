"""Speech to text on faster-whisper (CTranslate2 Whisper models).

One engine object holds one ``WhisperModel``. Everything here runs on the instance's worker thread:
the uploaded bytes are decoded by PyAV (faster-whisper's ``decode_audio``) inside ``transcribe``, so a
long mp3 never blocks the event loop.

A model folder is opened as a local path; faster-whisper only reaches the Hugging Face hub when given
a size name ("tiny") or a repository id, which this engine never passes (``local_files_only`` guards
the one code path that could).

Cancellation: faster-whisper decodes 30-second windows and yields one segment at a time; ``cancel``
is checked between segments, so a client that goes away frees the instance within one window.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from faster_whisper import WhisperModel
from faster_whisper.audio import decode_audio
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
        return WhisperModel(
            str(self.path),
            device="cpu",
            compute_type=self.config.compute_type,
            cpu_threads=self.config.device.threads or 0,  # 0 = CTranslate2 picks
            local_files_only=True,
        )

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
        audio = decode(job.audio, job.filename)
        segments, info = self.model.transcribe(
            audio,
            language=job.language,
            task="translate" if job.translate else "transcribe",
            beam_size=self.config.beam_size,
            temperature=_temperatures(job.temperature),
            initial_prompt=job.prompt or None,
            word_timestamps=job.word_timestamps,
            vad_filter=self.config.vad_filter,
        )
        duration = float(info.duration)
        yield TranscriptInfo(language=str(info.language), duration=duration)
        # ``segments`` is lazy: each next() decodes one more window, so this loop is where the time goes
        for index, segment in enumerate(segments):
            if cancel.is_set():
                return
            yield _segment(index, segment, duration)

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


def decode(data: bytes, filename: str) -> Any:
    """The upload as 16 kHz mono float32 samples, or a 400 naming the file."""
    try:
        samples = decode_audio(io.BytesIO(data), sampling_rate=SAMPLE_RATE)
    except Exception as exc:  # PyAV raises many kinds (InvalidDataError, ValueError, IndexError...)
        raise InvalidRequest(
            f"could not decode '{filename}' as audio ({type(exc).__name__}: {exc}); "
            "send wav, mp3, ogg, flac, webm or m4a",
            param="file",
        ) from None
    if samples.size == 0:
        raise InvalidRequest(f"'{filename}' contains no audio", param="file")
    return samples


def _temperatures(requested: float | None) -> Iterable[float]:
    if not requested:
        return FALLBACK_TEMPERATURES
    return (float(requested),)


def _segment(index: int, segment: Any, duration: float) -> TranscriptSegment:
    # Whisper's timestamps are token positions in a 30 s window: clamp them to the audio that exists.
    words = tuple(
        TranscriptWord(
            start=_clamp(w.start, duration),
            end=_clamp(w.end, duration),
            word=str(w.word),
            probability=float(w.probability),
        )
        for w in segment.words or ()
    )
    return TranscriptSegment(
        id=index,  # faster-whisper counts from 1, OpenAI from 0
        seek=int(segment.seek),
        start=_clamp(segment.start, duration),
        end=_clamp(segment.end, duration),
        text=str(segment.text),
        words=words,
        avg_logprob=float(segment.avg_logprob),
        no_speech_prob=float(segment.no_speech_prob),
        compression_ratio=float(segment.compression_ratio),
        temperature=float(segment.temperature) if segment.temperature is not None else None,
        tokens=tuple(int(t) for t in segment.tokens),
    )


def _clamp(value: Any, duration: float) -> float:
    return round(min(max(float(value), 0.0), duration), 3)
