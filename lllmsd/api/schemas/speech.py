"""POST /v1/audio/speech: the request, its conversion to a SpeechJob, and the SSE events.

Wire format (shared/OPENAI-WIRE.md): ``{model, input, voice, response_format, speed, instructions,
stream_format}`` answered with the audio file's bytes, or with ``stream_format: sse`` by
``speech.audio.delta`` events (base64 audio) and one ``speech.audio.done`` with the usage.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lllmsd.api.schemas.common import WireRequest
from lllmsd.core.jobs import SpeechAudio, SpeechJob
from lllmsd.core.sentences import split_sentences
from lllmsd.errors import InvalidRequest

MAX_INPUT_CHARS = 4096  # OpenAI's limit
# Bytes of audio per SSE event at most: a format sent whole (wav) would otherwise be one event of
# megabytes, more than SSE readers take on one line (aiohttp's limit is 512 KiB).
SSE_DELTA_BYTES = 32 * 1024
SpeechFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]

CONTENT_TYPES: dict[str, str] = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",  # Opus in Ogg, as OpenAI sends it
    "aac": "audio/aac",  # ADTS
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",  # raw 16-bit little-endian mono samples at 24 kHz
}


class VoiceId(BaseModel):
    """A voice by id, the SDK's ``{"id": ...}`` form."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=128)


class SpeechRequest(WireRequest):
    model: str = Field(min_length=1)
    input: str = Field(min_length=1, max_length=MAX_INPUT_CHARS, description="The text to speak.")
    voice: str | VoiceId = Field(description="A voice the model's config lists (OpenAI's names by default).")
    response_format: SpeechFormat = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"
    instructions: str | None = Field(None, description="Not supported: only OpenAI's own TTS models take it.")

    @field_validator("input")
    @classmethod
    def _something_to_say(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty: there is nothing to speak")
        return value

    @field_validator("instructions")
    @classmethod
    def _no_instructions(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("is not supported: only OpenAI's own TTS models can follow instructions")
        return value

    @property
    def voice_name(self) -> str:
        return self.voice.id if isinstance(self.voice, VoiceId) else self.voice

    def to_job(self, config: Any) -> SpeechJob:
        voices = config.voices
        voice = voices.get(self.voice_name)
        if voice is None:
            raise InvalidRequest(
                f"voice '{self.voice_name[:128]}' is not one of this model's voices: {', '.join(voices)}",
                param="voice",
            )
        sentences = tuple(split_sentences(self.input))
        if not sentences:
            raise InvalidRequest("input has nothing to speak: no letters or digits", param="input")
        return SpeechJob(
            sentences=sentences,
            voice=self.voice_name,
            speaker=voice.speaker,
            speed=self.speed,
            response_format=self.response_format,
        )


async def audio_bytes(events: AsyncIterator[SpeechAudio]) -> AsyncIterator[bytes]:
    """The file's bytes, skipping the events that carry none."""
    async for event in events:
        if event.data:
            yield event.data


async def sse_events(events: AsyncIterator[SpeechAudio], characters: int) -> AsyncIterator[dict[str, Any]]:
    """OpenAI's speech stream: a ``speech.audio.delta`` per piece of the file, then ``speech.audio.done``.
    Usage counts the input's characters as input tokens (no tokenizer is involved in speaking) and adds the
    seconds of audio produced."""
    seconds = 0.0
    async for event in events:
        seconds += event.seconds
        for start in range(0, len(event.data), SSE_DELTA_BYTES):
            piece = event.data[start : start + SSE_DELTA_BYTES]
            yield {"type": "speech.audio.delta", "audio": base64.b64encode(piece).decode("ascii")}
    usage = {"input_tokens": characters, "output_tokens": 0, "total_tokens": characters, "seconds": round(seconds, 3)}
    yield {"type": "speech.audio.done", "usage": usage}
