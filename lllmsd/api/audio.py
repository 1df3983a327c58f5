"""POST /v1/audio/transcriptions and /v1/audio/translations: multipart uploads to a speech-to-text model.

The form is read as a stream with hard limits: the whole body stays under ``max_body_size`` and the
audio file under ``max_audio_size`` (413 naming the limit as soon as either is crossed, before the rest
arrives), and an upload that stalls for ``client_timeout`` seconds gets 408 (a slow but steady upload
of a large file is fine). The audio is not decoded here: the engine decodes it on the instance's worker
thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from lllmsd.api.keys import MODEL, RUNTIME
from lllmsd.api.schemas.audio import (
    AudioRequest,
    TranscriptionRequest,
    TranslationRequest,
    collect_transcript,
    render,
    stream_events,
)
from lllmsd.api.sse import stream_sse
from lllmsd.core.jobs import JobKind
from lllmsd.errors import InvalidRequest, PayloadTooLarge

CHUNK = 64 * 1024
MAX_FIELD_SIZE = 64 * 1024  # a prompt is a few hundred tokens: anything this big is a mistake
LIST_FIELDS = frozenset({"timestamp_granularities"})
T = TypeVar("T")


@dataclass(slots=True)
class UploadedForm:
    fields: dict[str, Any] = field(default_factory=dict)
    audio: bytes | None = None
    filename: str = "audio"


async def transcriptions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, TranscriptionRequest, "transcribe")


async def translations(request: web.Request) -> web.StreamResponse:
    return await _serve(request, TranslationRequest, "translate")


async def _serve(request: web.Request, schema: type[AudioRequest], operation: str) -> web.StreamResponse:
    form = await read_form(request)
    if "model" in form.fields and isinstance(form.fields["model"], str):
        request[MODEL] = form.fields["model"]
    if form.audio is None:
        raise InvalidRequest("the 'file' field with the audio to transcribe is required", param="file")
    body = schema.model_validate(form.fields)
    if not form.audio:
        raise InvalidRequest(f"'{form.filename}' is empty", param="file")
    audio, filename = form.audio, form.filename
    admission = await request.app[RUNTIME].admit(
        body.model, JobKind.TRANSCRIPTION, lambda _: body.to_job(audio, filename)
    )
    async with admission.pool.acquire() as instance:
        events = instance.transcribe(admission.job)
        if body.stream:
            return await stream_sse(request, stream_events(events), done_marker=False)
        transcript = await collect_transcript(events)
    content_type, payload = render(transcript, body, operation)
    if isinstance(payload, dict):
        return web.json_response(payload)
    return web.Response(text=payload, content_type=content_type, charset="utf-8")


# ---------------------------------------------------------------------------------------- the form


async def read_form(request: web.Request) -> UploadedForm:
    """The multipart form: text fields by name (``x[]`` fields as lists) and the one audio file."""
    if request.content_type == "application/x-www-form-urlencoded":
        return await _read_urlencoded(request)  # cannot carry a file: answered with "file is required"
    if request.content_type != "multipart/form-data":
        raise web.HTTPUnsupportedMediaType(
            text=f"Content-Type must be multipart/form-data, got '{request.content_type or 'none'}'"
        )
    config = request.app[RUNTIME].config  # the running config: a reload may have changed the limits
    if request.content_length is not None and request.content_length > config.max_body_size:
        raise PayloadTooLarge(
            f"request body too large: {request.content_length} bytes "
            f"(limit {config.max_body_size} bytes, max_body_size)"
        )
    try:
        reader = await request.multipart()
    except ValueError as exc:
        raise InvalidRequest(f"malformed multipart body: {exc}") from None
    limits = _Limits(config.max_body_size, config.max_audio_size, config.client_timeout)
    form = UploadedForm()
    try:
        while (part := await limits.wait(reader.next())) is not None:
            if not isinstance(part, BodyPartReader):
                raise InvalidRequest("nested multipart bodies are not supported")
            await _read_part(part, form, limits)
    except (ValueError, AssertionError, HttpProcessingError) as exc:  # aiohttp's parser on a broken body
        raise InvalidRequest(f"malformed multipart body: {exc}") from None
    return form


async def _read_urlencoded(request: web.Request) -> UploadedForm:
    form = UploadedForm()
    limits = _Limits(0, 0, request.app[RUNTIME].config.client_timeout)
    for name, value in (await limits.wait(request.post())).items():  # bounded by client_max_size
        key = name.removesuffix("[]")
        if name.endswith("[]") or key in LIST_FIELDS:
            form.fields.setdefault(key, []).append(str(value))
        elif key != "file":
            form.fields[key] = str(value)
    return form


@dataclass(slots=True)
class _Limits:
    """The bounds one upload is read within: body and audio sizes, and how long it may stall."""

    body: int
    audio: int
    stall: float  # seconds without a byte arriving (client_timeout); slow but steady uploads are fine
    used: int = 0

    def take(self, n: int) -> None:
        self.used += n
        if self.used > self.body:
            raise PayloadTooLarge(f"request body too large (limit {self.body} bytes, max_body_size)")

    async def wait(self, step: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(step, self.stall)
        except asyncio.TimeoutError:
            raise web.HTTPRequestTimeout(
                text=f"the upload stalled: nothing arrived for {self.stall:g}s (client_timeout)"
            ) from None


async def _read_part(part: BodyPartReader, form: UploadedForm, limits: _Limits) -> None:
    name = part.name or ""
    if name == "file" and part.filename is not None:
        if form.audio is not None:
            raise InvalidRequest("send one 'file' per request", param="file")
        form.filename = _safe_filename(part.filename)
        too_large = f"'{form.filename}' is larger than the {limits.audio}-byte audio limit (max_audio_size)"
        form.audio = await _read_bounded(part, limits, limits.audio, too_large)
        return
    raw = await _read_bounded(part, limits, MAX_FIELD_SIZE, f"form field '{name}' is too large")
    value = raw.decode(part.get_charset("utf-8"), errors="replace")
    key = name.removesuffix("[]")
    if name.endswith("[]") or key in LIST_FIELDS:
        form.fields.setdefault(key, []).append(value)
    elif key == "file":
        raise InvalidRequest("'file' must be an uploaded file (multipart part with a filename)", param="file")
    else:
        form.fields[key] = value


async def _read_bounded(part: BodyPartReader, limits: _Limits, limit: int, too_large: str) -> bytes:
    data = bytearray()
    while chunk := await limits.wait(part.read_chunk(CHUNK)):
        limits.take(len(chunk))
        data += chunk
        if len(data) > limit:
            raise PayloadTooLarge(too_large, param=part.name)
    return bytes(data)


def _safe_filename(name: str) -> str:
    """The client's file name, shortened and stripped of folders, for error messages."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return base[:120] or "audio"
