"""POST /v1/audio/speech: text to speech, the audio streamed sentence by sentence as it is synthesized.

With ``stream_format: audio`` (the default) the body is the audio file, sent in chunks as the engine
encodes each sentence (wav, whose header needs the final size, arrives whole: engines/speech_encoder.py).
Headers go out with the first audio bytes, so a failure before any audio (a voice that failed to load)
is still a proper status. A failure after that cannot change the status: the connection is cut without
the chunked body's final chunk, so the client sees an incomplete response, never a short file that
looks whole. With ``stream_format: sse`` a failure is an error event, as in every other stream.

A client that goes away is noticed when its connection closes (``lllmsd serve`` cancels the handler), or
at the latest at the next write: closing the event stream cancels the engine's call, which stops before
its next sentence, and the instance goes back to the pool.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from lllmsd.api.keys import MODEL, REQUEST_ID, RUNTIME
from lllmsd.api.metrics import observe_speech
from lllmsd.api.middleware import read_json
from lllmsd.api.schemas.speech import CONTENT_TYPES, SpeechRequest, audio_bytes, sse_events
from lllmsd.api.sse import stream_sse
from lllmsd.core.jobs import JobKind

log = logging.getLogger(__name__)


async def speech(request: web.Request) -> web.StreamResponse:
    body = SpeechRequest.model_validate(await read_json(request))
    request[MODEL] = body.model
    admission = await request.app[RUNTIME].admit(body.model, JobKind.SPEECH, body.to_job)
    async with admission.pool.acquire() as instance:
        events = observe_speech(request, body.model, instance.speak(admission.job))
        if body.stream_format == "sse":
            return await stream_sse(request, sse_events(events, len(body.input)), done_marker=False)
        return await stream_audio(request, audio_bytes(events), CONTENT_TYPES[body.response_format])


async def stream_audio(request: web.Request, chunks: AsyncIterator[bytes], content_type: str) -> web.StreamResponse:
    async with contextlib.aclosing(chunks):  # type: ignore[type-var]
        first = await anext(chunks, b"")  # before any header: an error here is still a status
        response = web.StreamResponse(
            headers={
                "Content-Type": content_type,
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # a proxy in front must pass each sentence on at once
                "X-Request-Id": request.get(REQUEST_ID, ""),
            }
        )
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            await response.write(first)
            async for chunk in chunks:
                await response.write(chunk)
        except ConnectionError:
            raise  # the client left: nothing more to send (closing ``chunks`` stops the engine)
        except Exception:
            log.exception("speech stream failed after its headers were sent (request id %s)", request.get(REQUEST_ID))
            _cut(request)
            return response
        await response.write_eof()
    return response


def _cut(request: web.Request) -> None:
    """End the connection without the last chunk of the body: the client's read fails, as it must."""
    transport = request.transport
    if transport is not None:
        transport.abort()
