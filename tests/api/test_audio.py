"""/v1/audio/transcriptions and /v1/audio/translations through the whole HTTP app.

Speech recognition runs on the real faster-whisper engine with tiny.en, loaded once for the module and
shared by the per-test daemons; error paths that need no recognition use the FakeEngine too.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import openai
import pytest
from aiohttp import FormData
from aiohttp.test_utils import TestClient
from faster_whisper import WhisperModel

from lllmsd.api.keys import RUNTIME
from lllmsd.engines.faster_whisper import FasterWhisperEngine
from tests.conftest import AppFactory, fake_model, make_config, sdk
from tests.setup_models import model_path
from tests.speech import Speech, hears_fox, make_speech


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Speech:
    return make_speech(tmp_path_factory.mktemp("speech"))


@pytest.fixture(scope="module")
def tiny_model() -> WhisperModel:
    return WhisperModel(str(model_path("whisper-tiny-en")), device="cpu", compute_type="int8", local_files_only=True)


@pytest.fixture
def engines(tiny_model: WhisperModel) -> dict[str, type]:
    class SharedWhisper(FasterWhisperEngine):
        """The real engine, on the module's already loaded model (one load per module, not per test)."""

        def _load_model(self) -> Any:
            return tiny_model

    return {"faster-whisper": SharedWhisper}


def models(**daemon: Any) -> Any:
    return make_config(
        {
            "whisper": {
                "task": "speech-to-text",
                "engine": "faster-whisper",
                "location": str(model_path("whisper-tiny-en")),
            },
            "fake-stt": {"task": "speech-to-text", "engine": "fake"},
            "chat": fake_model(),
        },
        **daemon,
    )


@pytest.fixture
async def client(start_app: AppFactory, engines: dict[str, type]) -> TestClient:
    return await start_app(models(), engines=engines)


def form(audio: bytes | None, filename: str = "fox.wav", **fields: Any) -> FormData:
    data = FormData(default_to_multipart=True)
    for name, value in fields.items():
        for item in value if isinstance(value, list) else [value]:
            data.add_field(name, str(item))
    if audio is not None:
        data.add_field("file", audio, filename=filename, content_type="application/octet-stream")
    return data


async def post(
    client: TestClient, audio: bytes | None, path: str = "/v1/audio/transcriptions", **fields: Any
) -> tuple[int, str, str]:
    filename = fields.pop("filename", "fox.wav")
    response = await client.post(path, data=form(audio, filename, **fields))
    return response.status, response.content_type, await response.text()


def envelope(text: str) -> dict[str, Any]:
    body = json.loads(text)
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# ---------------------------------------------------------------------------------- response formats


async def test_sdk_json_text_and_verbose_json(client: TestClient, speech: Speech) -> None:
    async with sdk(client) as api:
        plain = await api.audio.transcriptions.create(model="whisper", file=("fox.wav", speech.read()))
        text = await api.audio.transcriptions.create(
            model="whisper", file=("fox.wav", speech.read()), response_format="text"
        )
        verbose = await api.audio.transcriptions.create(
            model="whisper",
            file=("fox.mp3", speech.read("mp3")),
            response_format="verbose_json",
            timestamp_granularities=["word", "segment"],
            language="en",
        )
    assert hears_fox(plain.text)
    assert plain.usage is not None
    assert plain.usage.type == "duration"
    assert isinstance(text, str)
    assert hears_fox(text)
    assert text == text.strip()
    assert hears_fox(verbose.text)
    assert verbose.language == "english"
    assert verbose.duration == pytest.approx(speech.duration, abs=0.15)
    assert verbose.segments
    assert verbose.segments[0].id == 0
    assert verbose.segments[0].tokens
    assert verbose.words
    assert hears_fox(" ".join(w.word for w in verbose.words))
    assert all(w.word == w.word.strip() for w in verbose.words)
    starts = [w.start for w in verbose.words]
    assert starts == sorted(starts)
    assert all(0 <= w.start <= w.end <= verbose.duration for w in verbose.words)


async def test_verbose_json_has_segments_by_default_and_words_only_when_asked(
    client: TestClient, speech: Speech
) -> None:
    status, _, text = await post(client, speech.read(), model="whisper", response_format="verbose_json")
    assert status == 200
    body = json.loads(text)
    assert body["task"] == "transcribe"
    assert "words" not in body
    segment = body["segments"][0]
    assert set(segment) == {
        "id",
        "seek",
        "start",
        "end",
        "text",
        "tokens",
        "temperature",
        "avg_logprob",
        "compression_ratio",
        "no_speech_prob",
    }
    status, _, text = await post(
        client,
        speech.read(),
        model="whisper",
        response_format="verbose_json",
        **{"timestamp_granularities[]": "word"},
    )
    body = json.loads(text)
    assert status == 200
    assert body["words"]
    assert "segments" not in body


SRT_CUE = re.compile(r"^(\d+)\n(\d\d):(\d\d):(\d\d),(\d{3}) --> (\d\d):(\d\d):(\d\d),(\d{3})\n(.+)$")
VTT_CUE = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) --> (\d\d):(\d\d):(\d\d)\.(\d{3})\n(.+)$")


def seconds(h: str, m: str, s: str, ms: str) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def check_cues(cues: list[tuple[float, float, str]], duration: float) -> None:
    assert cues
    previous = 0.0
    for start, end, _ in cues:
        assert previous <= start <= end <= duration
        previous = end
    assert hears_fox(" ".join(text for *_, text in cues))


async def test_srt(client: TestClient, speech: Speech) -> None:
    status, content_type, text = await post(client, speech.read(), model="whisper", response_format="srt")
    assert status == 200
    assert content_type == "application/x-subrip"
    cues = []
    for number, block in enumerate(text.strip().split("\n\n"), start=1):
        match = SRT_CUE.match(block)
        assert match, block
        assert int(match[1]) == number
        cues.append((seconds(*match.groups()[1:5]), seconds(*match.groups()[5:9]), match[10]))
    check_cues(cues, speech.duration)


async def test_vtt(client: TestClient, speech: Speech) -> None:
    status, content_type, text = await post(client, speech.read("ogg"), model="whisper", response_format="vtt")
    assert status == 200
    assert content_type == "text/vtt"
    header, *blocks = text.strip().split("\n\n")
    assert header == "WEBVTT"
    cues = []
    for block in blocks:
        match = VTT_CUE.match(block)
        assert match, block
        cues.append((seconds(*match.groups()[0:4]), seconds(*match.groups()[4:8]), match[9]))
    check_cues(cues, speech.duration)


@pytest.mark.parametrize("kind", ["mp3", "ogg"])
async def test_mp3_and_ogg_uploads(client: TestClient, speech: Speech, kind: str) -> None:
    status, content_type, text = await post(
        client, speech.read(kind), model="whisper", response_format="text", filename=f"fox.{kind}"
    )
    assert status == 200
    assert content_type == "text/plain"
    assert hears_fox(text)


# -------------------------------------------------------------------------------------------- stream


def sse_events(text: str) -> list[dict[str, Any]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = [line for line in block.split("\n") if not line.startswith(":")]
        if lines:
            assert lines[0].startswith("data: "), block
            events.append(json.loads(lines[0].removeprefix("data: ")))
    return events


async def test_stream_sends_deltas_then_done(client: TestClient, speech: Speech) -> None:
    response = await client.post("/v1/audio/transcriptions", data=form(speech.read(), model="whisper", stream="true"))
    assert response.status == 200
    assert response.content_type == "text/event-stream"
    raw = await response.text()
    assert "[DONE]" not in raw  # OpenAI's transcription stream ends with its done event
    events = sse_events(raw)
    types = [e["type"] for e in events]
    assert types[-1] == "transcript.text.done"
    assert types[:-1]
    assert set(types[:-1]) == {"transcript.text.delta"}
    done = events[-1]["text"]
    assert hears_fox(done)
    assert "".join(e["delta"] for e in events[:-1]).strip() == done


async def test_stream_through_the_sdk(client: TestClient, speech: Speech) -> None:
    async with sdk(client) as api:
        stream = await api.audio.transcriptions.create(model="whisper", file=("fox.wav", speech.read()), stream=True)
        events = [event async for event in stream]
    assert events[-1].type == "transcript.text.done"
    assert all(e.type == "transcript.text.delta" for e in events[:-1])
    assert hears_fox(events[-1].text)


# ------------------------------------------------------------------------------------- translations


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK deprecates whisper-1 translations
async def test_translation_route_on_the_fake_engine(client: TestClient) -> None:
    async with sdk(client) as api:
        result = await api.audio.translations.create(model="fake-stt", file=("a.wav", b"\x00" * 3200))
    assert result.text == "fake translation of 3200 bytes"
    status, _, text = await post(
        client, b"\x00" * 3200, "/v1/audio/translations", model="fake-stt", response_format="verbose_json"
    )
    assert status == 200
    assert json.loads(text)["task"] == "translate"


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
async def test_translation_on_an_english_only_model_is_a_400(client: TestClient, speech: Speech) -> None:
    status, _, text = await post(client, speech.read(), "/v1/audio/translations", model="whisper")
    assert status == 400
    error = envelope(text)
    assert "English-only" in error["message"]
    assert error["param"] == "model"
    async with sdk(client) as api:
        with pytest.raises(openai.BadRequestError):
            await api.audio.translations.create(model="whisper", file=("fox.wav", speech.read()))


# ------------------------------------------------------------------------------------------- errors


async def test_upload_over_the_audio_limit_is_a_413_naming_it(start_app: AppFactory) -> None:
    client = await start_app(models(max_audio_size=4000))
    status, _, text = await post(client, b"\x01" * 5000, model="fake-stt", filename="big.wav")
    assert status == 413
    error = envelope(text)
    assert "4000" in error["message"]
    assert "big.wav" in error["message"]
    status, _, _ = await post(client, b"\x01" * 3900, model="fake-stt")
    assert status == 200


async def test_body_over_the_body_limit_is_a_413(start_app: AppFactory) -> None:
    client = await start_app(models(max_body_size=2048, max_audio_size=10_000))
    status, _, text = await post(client, b"\x01" * 5000, model="fake-stt")
    assert status == 413
    assert "2048" in envelope(text)["message"]


async def test_413_through_the_sdk(start_app: AppFactory) -> None:
    client = await start_app(models(max_audio_size=1024))
    async with sdk(client) as api:
        with pytest.raises(openai.APIStatusError) as caught:
            await api.audio.transcriptions.create(model="fake-stt", file=("big.wav", b"\x01" * 100_000))
    assert caught.value.status_code == 413


@pytest.mark.parametrize(
    ("audio", "filename"),
    [(b"just some notes, not a recording\n" * 40, "notes.txt"), (b"\x89PNG\r\n\x1a\n" + bytes(200), "cat.png")],
)
async def test_not_audio_is_a_400_naming_the_file(client: TestClient, audio: bytes, filename: str) -> None:
    status, _, text = await post(client, audio, model="whisper", filename=filename)
    assert status == 400
    error = envelope(text)
    assert filename in error["message"]
    assert error["param"] == "file"
    # a bad upload does not cost the instance
    assert [i.state.value for i in client.server.app[RUNTIME].pools["whisper"].instances] == ["idle"]


async def test_not_audio_in_a_stream_is_still_a_400(client: TestClient) -> None:
    status, content_type, text = await post(
        client, b"not audio" * 100, model="whisper", stream="true", filename="x.bin"
    )
    assert status == 400
    assert content_type == "application/json"
    assert "x.bin" in envelope(text)["message"]


async def test_missing_file_is_a_400(client: TestClient) -> None:
    status, _, text = await post(client, None, model="whisper")
    assert status == 400
    error = envelope(text)
    assert error["param"] == "file"
    # a text field called file is not an upload
    status, _, text = await post(client, None, model="whisper", file="fox.wav")
    assert status == 400
    assert envelope(text)["param"] == "file"
    # a urlencoded form cannot carry one
    response = await client.post("/v1/audio/transcriptions", data={"model": "whisper"})
    assert response.status == 400
    assert envelope(await response.text())["param"] == "file"


@pytest.mark.parametrize(
    ("language", "words"),
    [("xx", ["'xx'"]), ("fr", ["English-only", "'fr'"]), ("klingon", ["language"])],
)
async def test_a_language_the_model_cannot_do_is_a_400(
    client: TestClient, speech: Speech, language: str, words: list[str]
) -> None:
    status, _, text = await post(client, speech.read(), model="whisper", language=language)
    assert status == 400
    error = envelope(text)
    assert error["param"] == "language"
    for word in words:
        assert word in error["message"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"model": "whisper", "response_format": "docx"}, "response_format"),
        ({"model": "whisper", "temperature": "1.5"}, "temperature"),
        ({"model": "whisper", "timestamp_granularities[]": "word"}, None),  # needs verbose_json
        ({"model": "whisper", "stream": "true", "response_format": "srt"}, None),
        ({"model": "whisper", "speaker": "bob"}, "speaker"),
        ({}, "model"),
    ],
)
async def test_bad_fields_are_400s(client: TestClient, fields: dict[str, Any], param: str | None) -> None:
    status, _, text = await post(client, b"\x00" * 100, **fields)
    assert status == 400
    error = envelope(text)
    if param is not None:
        assert error["param"] == param


async def test_wrong_model_kinds(client: TestClient) -> None:
    status, _, text = await post(client, b"\x00" * 100, model="chat")
    assert status == 400
    assert "text-completion" in envelope(text)["message"]
    status, _, text = await post(client, b"\x00" * 100, model="nope")
    assert status == 404
    assert envelope(text)["code"] == "model_not_found"


async def test_json_body_is_a_415(client: TestClient) -> None:
    response = await client.post("/v1/audio/transcriptions", json={"model": "whisper", "file": "x"})
    assert response.status == 415
    assert "multipart/form-data" in envelope(await response.text())["message"]


def multipart_body(boundary: str, audio: bytes, model: str = "fake-stt") -> bytes:
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + audio + f"\r\n--{boundary}--\r\n".encode()


async def chunked(data: bytes, size: int = 1000) -> Any:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_chunked_upload_without_content_length_is_bounded_too(start_app: AppFactory) -> None:
    client = await start_app(models(max_body_size=4096, max_audio_size=100_000))
    headers = {"Content-Type": "multipart/form-data; boundary=XyZ"}
    response = await client.post(
        "/v1/audio/transcriptions", data=chunked(multipart_body("XyZ", b"\x01" * 10_000)), headers=headers
    )
    assert response.status == 413
    assert "4096" in envelope(await response.text())["message"]
    response = await client.post(
        "/v1/audio/transcriptions", data=chunked(multipart_body("XyZ", b"\x01" * 3000)), headers=headers
    )
    assert response.status == 200
    assert (await response.json())["text"] == "fake transcript of 3000 bytes"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b"--x\r\n"),  # no boundary parameter
        ("multipart/form-data; boundary=B", b"garbage without any boundary"),
        ("multipart/form-data; boundary=B", b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\nfa'),
    ],
)
async def test_malformed_multipart_is_a_4xx_envelope(client: TestClient, content_type: str, body: bytes) -> None:
    response = await client.post("/v1/audio/transcriptions", data=body, headers={"Content-Type": content_type})
    assert 400 <= response.status < 500
    envelope(await response.text())


async def _stalling_upload(boundary: str) -> Any:
    yield multipart_body(boundary, b"\x01" * 2000)[:-100]
    await asyncio.Event().wait()  # the rest never comes (cancelled when the connection closes)


async def test_a_stalled_upload_is_a_408(start_app: AppFactory) -> None:
    client = await start_app(models(client_timeout=0.2))
    response = await client.post(
        "/v1/audio/transcriptions",
        data=_stalling_upload("XyZ"),
        headers={"Content-Type": "multipart/form-data; boundary=XyZ"},
    )
    assert response.status == 408
    assert "client_timeout" in envelope(await response.text())["message"]
