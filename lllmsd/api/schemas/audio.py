"""Transcriptions and translations: the form fields, their conversion to a core task, and every output.

Output formats follow OpenAI (shared/OPENAI-WIRE.md): ``json`` ``{"text", "usage"}``, ``text`` plain,
``srt`` / ``vtt`` subtitles, ``verbose_json`` with ``segments`` (and ``words`` when asked for), and with
``stream=true`` the SSE events ``transcript.text.delta`` ... ``transcript.text.done``. Nothing below the
API layer sees these classes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, model_validator

from lllmsd.api.schemas.common import WireRequest
from lllmsd.core.jobs import TranscriptInfo, TranscriptionEvent, TranscriptionJob, TranscriptSegment

ResponseFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]
Granularity = Literal["word", "segment"]

# Whisper's language codes and the names OpenAI's verbose_json reports ("language": "english").
_NAMES = (
    "en=english zh=chinese de=german es=spanish ru=russian ko=korean fr=french ja=japanese pt=portuguese "
    "tr=turkish pl=polish ca=catalan nl=dutch ar=arabic sv=swedish it=italian id=indonesian hi=hindi "
    "fi=finnish vi=vietnamese he=hebrew uk=ukrainian el=greek ms=malay cs=czech ro=romanian da=danish "
    "hu=hungarian ta=tamil no=norwegian th=thai ur=urdu hr=croatian bg=bulgarian lt=lithuanian la=latin "
    "mi=maori ml=malayalam cy=welsh sk=slovak te=telugu fa=persian lv=latvian bn=bengali sr=serbian "
    "az=azerbaijani sl=slovenian kn=kannada et=estonian mk=macedonian br=breton eu=basque is=icelandic "
    "hy=armenian ne=nepali mn=mongolian bs=bosnian kk=kazakh sq=albanian sw=swahili gl=galician mr=marathi "
    "pa=punjabi si=sinhala km=khmer sn=shona yo=yoruba so=somali af=afrikaans oc=occitan ka=georgian "
    "be=belarusian tg=tajik sd=sindhi gu=gujarati am=amharic yi=yiddish lo=lao uz=uzbek fo=faroese "
    "ht=haitian_creole ps=pashto tk=turkmen nn=nynorsk mt=maltese sa=sanskrit lb=luxembourgish my=myanmar "
    "bo=tibetan tl=tagalog mg=malagasy as=assamese tt=tatar haw=hawaiian ln=lingala ha=hausa ba=bashkir "
    "jw=javanese su=sundanese yue=cantonese"
)
LANGUAGE_NAMES: dict[str, str] = {
    code: name.replace("_", " ") for code, _, name in (item.partition("=") for item in _NAMES.split())
}

CONTENT_TYPES: dict[str, str] = {
    "text": "text/plain",
    "srt": "application/x-subrip",
    "vtt": "text/vtt",
}


# ------------------------------------------------------------------------------------------ requests


class TranslationRequest(WireRequest):
    """The form fields of POST /v1/audio/translations (the file travels separately)."""

    model: str = Field(min_length=1)
    prompt: str | None = None
    response_format: ResponseFormat = "json"
    temperature: float | None = Field(None, ge=0, le=1)

    @property
    def stream(self) -> bool:
        return False

    @property
    def granularities(self) -> frozenset[str]:
        return frozenset()

    def to_job(self, audio: bytes, filename: str) -> TranscriptionJob:
        return TranscriptionJob(
            audio=audio, filename=filename, prompt=self.prompt, temperature=self.temperature, translate=True
        )


class TranscriptionRequest(WireRequest):
    """The form fields of POST /v1/audio/transcriptions (the file travels separately)."""

    model: str = Field(min_length=1)
    language: str | None = Field(None, min_length=2, max_length=8)
    prompt: str | None = None
    response_format: ResponseFormat = "json"
    temperature: float | None = Field(None, ge=0, le=1)
    timestamp_granularities: list[Granularity] | None = None
    stream: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> TranscriptionRequest:
        if self.timestamp_granularities and self.response_format != "verbose_json":
            raise ValueError("timestamp_granularities[] needs response_format verbose_json")
        if self.stream and self.response_format not in ("json", "text"):
            raise ValueError(
                "stream=true sends transcript.text events; response_format must be json or text, "
                f"not {self.response_format}"
            )
        return self

    @property
    def granularities(self) -> frozenset[str]:
        return frozenset(self.timestamp_granularities or ())

    def to_job(self, audio: bytes, filename: str) -> TranscriptionJob:
        return TranscriptionJob(
            audio=audio,
            filename=filename,
            language=self.language.lower() if self.language else None,
            prompt=self.prompt,
            temperature=self.temperature,
            word_timestamps="word" in self.granularities,
        )


AudioRequest = TranscriptionRequest | TranslationRequest


# ------------------------------------------------------------------------------------------- results


@dataclass(slots=True)
class Transcript:
    """A whole transcription, collected from the engine's events."""

    language: str = ""
    duration: float = 0.0
    segments: list[TranscriptSegment] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments).strip()


async def collect_transcript(events: AsyncIterator[TranscriptionEvent]) -> Transcript:
    transcript = Transcript()
    async for event in events:
        if isinstance(event, TranscriptInfo):
            transcript.language, transcript.duration = event.language, event.duration
        else:
            transcript.segments.append(event)
    return transcript


def render(transcript: Transcript, body: AudioRequest, task: str) -> tuple[str, str | dict[str, Any]]:
    """(content type, body) for a non-streaming response: a str body is sent as is, a dict as JSON."""
    fmt = body.response_format
    if fmt == "json":
        return "application/json", {"text": transcript.text, "usage": _usage(transcript)}
    if fmt == "verbose_json":
        return "application/json", verbose_json(transcript, task, body.granularities)
    if fmt == "srt":
        return CONTENT_TYPES[fmt], srt(transcript.segments)
    if fmt == "vtt":
        return CONTENT_TYPES[fmt], vtt(transcript.segments)
    return CONTENT_TYPES["text"], transcript.text


def _usage(transcript: Transcript) -> dict[str, Any]:
    return {"type": "duration", "seconds": round(transcript.duration, 3)}


def verbose_json(transcript: Transcript, task: str, granularities: frozenset[str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "task": task,
        "language": LANGUAGE_NAMES.get(transcript.language, transcript.language),
        "duration": round(transcript.duration, 3),
        "text": transcript.text,
    }
    # OpenAI's default granularity is segment; asking for words alone leaves segments out
    if "segment" in granularities or not granularities:
        out["segments"] = [_segment_json(s) for s in transcript.segments]
    if "word" in granularities:
        out["words"] = [
            {"word": w.word.strip(), "start": w.start, "end": w.end} for s in transcript.segments for w in s.words
        ]
    out["usage"] = _usage(transcript)
    return out


def _segment_json(segment: TranscriptSegment) -> dict[str, Any]:
    return {
        "id": segment.id,
        "seek": segment.seek,
        "start": segment.start,
        "end": segment.end,
        "text": segment.text,
        "tokens": list(segment.tokens),
        "temperature": segment.temperature or 0.0,
        "avg_logprob": segment.avg_logprob if segment.avg_logprob is not None else 0.0,
        "compression_ratio": segment.compression_ratio if segment.compression_ratio is not None else 0.0,
        "no_speech_prob": segment.no_speech_prob if segment.no_speech_prob is not None else 0.0,
    }


def timestamp(seconds: float, separator: str) -> str:
    """HH:MM:SS,mmm (srt) or HH:MM:SS.mmm (vtt)."""
    millis = round(max(seconds, 0.0) * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def srt(segments: list[TranscriptSegment]) -> str:
    cues = [
        f"{n}\n{timestamp(s.start, ',')} --> {timestamp(s.end, ',')}\n{s.text.strip()}\n"
        for n, s in enumerate(segments, start=1)
    ]
    return "\n".join(cues)


def vtt(segments: list[TranscriptSegment]) -> str:
    cues = [f"{timestamp(s.start, '.')} --> {timestamp(s.end, '.')}\n{s.text.strip()}\n" for s in segments]
    return "WEBVTT\n\n" + "\n".join(cues)


async def stream_events(events: AsyncIterator[TranscriptionEvent]) -> AsyncIterator[dict[str, Any]]:
    """OpenAI's transcription stream: one ``transcript.text.delta`` per segment, then ``...done``.

    The deltas concatenate to the final text (the first loses Whisper's leading space). Nothing is sent
    before the first segment is decoded, so an undecodable file still gets a plain 400, not a stream.
    """
    pieces: list[str] = []
    async for event in events:
        if isinstance(event, TranscriptInfo):
            continue
        delta = event.text if pieces and "".join(pieces) else event.text.lstrip()
        pieces.append(delta)
        yield {"type": "transcript.text.delta", "delta": delta}
    yield {"type": "transcript.text.done", "text": "".join(pieces).strip()}
