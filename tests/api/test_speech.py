"""POST /v1/audio/speech through the whole HTTP app and the official SDK, on the FakeEngine's tones.

The FakeEngine speaks a tone of FAKE_SPEECH_SECONDS_PER_CHAR seconds a character per sentence, so each
file's length is known; the encoding is the real one (PyAV), as for Piper. Piper and the Whisper round
trip are in tests/engines/test_piper.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientPayloadError
from aiohttp.test_utils import TestClient

from lllmsd.api.keys import RUNTIME
from lllmsd.core.jobs import SpeechJob
from lllmsd.core.sentences import split_sentences
from lllmsd.engines.fake import FAKE_SPEECH_SECONDS_PER_CHAR, FakeEngine
from tests.api.probe import eventually
from tests.api.speech_engines import GATE_ENV, GatedSpeechEngine
from tests.conftest import AppFactory, fake_model, make_config, sdk, sse_data
from tests.speech import PCM_RATE, decoded_seconds

FORMATS = ["mp3", "opus", "aac", "flac", "wav", "pcm"]
CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
TWO_SENTENCES = "The quick brown fox jumps over the lazy dog. A second sentence follows the first one."
FIVE_SENTENCES = " ".join(f"This is sentence {n}, spoken on its own." for n in ("one", "two", "three", "four", "five"))


def tts_model(**options: Any) -> dict[str, Any]:
    return {"task": "text-to-speech", "engine": "fake", **options}


def expected_seconds(text: str, speed: float = 1.0) -> float:
    return sum(len(s) for s in split_sentences(text)) * FAKE_SPEECH_SECONDS_PER_CHAR / speed


@pytest.fixture
async def client(start_app: AppFactory) -> TestClient:
    return await start_app(make_config({"tts": tts_model(), "chat": fake_model()}))


async def speak(client: TestClient, **body: Any) -> Any:
    return await client.post("/v1/audio/speech", json={"model": "tts", "voice": "alloy", **body})


def envelope(body: Any) -> dict[str, Any]:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# ------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("response_format", FORMATS)
async def test_every_format_through_the_sdk_decodes_to_the_spoken_length(
    client: TestClient, response_format: str
) -> None:
    async with sdk(client) as api:
        answer = await api.audio.speech.create(
            model="tts", voice="alloy", input=TWO_SENTENCES, response_format=response_format
        )
    assert answer.response.headers["content-type"] == CONTENT_TYPES[response_format]
    seconds, rate = decoded_seconds(answer.content, response_format)
    assert seconds == pytest.approx(expected_seconds(TWO_SENTENCES), rel=0.1)
    if response_format == "pcm":
        assert rate == PCM_RATE
        # raw samples, no header: exactly two bytes a sample at 24 kHz
        assert len(answer.content) / 2 / PCM_RATE == pytest.approx(expected_seconds(TWO_SENTENCES), rel=0.01)


async def test_the_default_format_is_mp3_and_both_prefixes_serve_it(client: TestClient) -> None:
    for prefix in ("/v1", "/openai/v1"):
        response = await client.post(f"{prefix}/audio/speech", json={"model": "tts", "voice": "nova", "input": "Hi."})
        assert response.status == 200
        assert response.content_type == "audio/mpeg"
        data = await response.read()
        assert decoded_seconds(data, "mp3")[0] == pytest.approx(expected_seconds("Hi."), abs=0.1)


@pytest.mark.parametrize("response_format", ["wav", "pcm"])
async def test_speed_two_gives_half_the_duration(client: TestClient, response_format: str) -> None:
    durations = {}
    for speed in (1.0, 2.0):
        response = await speak(client, input=TWO_SENTENCES, response_format=response_format, speed=speed)
        assert response.status == 200
        durations[speed] = decoded_seconds(await response.read(), response_format)[0]
    assert durations[2.0] == pytest.approx(durations[1.0] / 2, rel=0.05)


async def test_a_voice_by_id_and_a_configured_voice_list(start_app: AppFactory) -> None:
    client = await start_app(make_config({"tts": tts_model(voices={"narrator": {"speaker": 0}})}))
    response = await client.post(
        "/v1/audio/speech", json={"model": "tts", "voice": {"id": "narrator"}, "input": "Hello."}
    )
    assert response.status == 200
    response = await client.post("/v1/audio/speech", json={"model": "tts", "voice": "alloy", "input": "Hello."})
    assert response.status == 400
    error = envelope(await response.json())
    assert error["param"] == "voice"
    assert "narrator" in error["message"]


# --------------------------------------------------------------------------------------------- streaming


@pytest.fixture
def gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "gate"
    monkeypatch.setenv(GATE_ENV, str(path))  # worker processes inherit it
    return path


@pytest.mark.parametrize("isolation", ["thread", "process"])
@pytest.mark.parametrize("response_format", ["mp3", "opus", "aac", "flac", "pcm"])
async def test_the_first_sentence_is_sent_before_the_rest_is_synthesized(
    start_app: AppFactory, gate: Path, isolation: str, response_format: str
) -> None:
    """The engine holds sentences two to five back until the test has received audio: a daemon that
    waited for the whole text before sending would never get there (the read times out)."""
    client = await start_app(make_config({"tts": tts_model(isolation=isolation)}), engines={"fake": GatedSpeechEngine})
    response = await speak(client, input=FIVE_SENTENCES, response_format=response_format)
    assert response.status == 200
    first = await asyncio.wait_for(response.content.readany(), 30)
    assert first
    assert not await asyncio.to_thread(gate.exists)  # nothing past the first sentence was synthesized yet
    await asyncio.to_thread(gate.touch)
    data = first + await response.read()
    assert decoded_seconds(data, response_format)[0] == pytest.approx(expected_seconds(FIVE_SENTENCES), rel=0.1)


async def test_with_streaming_response_through_the_sdk(client: TestClient) -> None:
    async with (
        sdk(client) as api,
        api.audio.speech.with_streaming_response.create(
            model="tts", voice="echo", input=FIVE_SENTENCES, response_format="opus"
        ) as streamed,
    ):
        assert streamed.headers["content-type"] == "audio/ogg"
        pieces = [piece async for piece in streamed.iter_bytes()]
    data = b"".join(pieces)
    assert data.startswith(b"OggS")
    assert decoded_seconds(data, "opus")[0] == pytest.approx(expected_seconds(FIVE_SENTENCES), rel=0.1)


@pytest.mark.parametrize("response_format", ["mp3", "wav"])
async def test_sse_deltas_make_the_file_and_done_has_usage(client: TestClient, response_format: str) -> None:
    response = await speak(client, input=FIVE_SENTENCES, response_format=response_format, stream_format="sse")
    assert response.status == 200
    assert response.content_type == "text/event-stream"
    events = await sse_data(response)
    deltas, done = events[:-1], events[-1]
    assert deltas
    assert all(set(e) == {"type", "audio"} and e["type"] == "speech.audio.delta" for e in deltas)
    if response_format != "wav":
        assert len(deltas) >= 5  # a delta per sentence at least: streamed, not one file at the end
    data = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    seconds = expected_seconds(FIVE_SENTENCES)
    assert decoded_seconds(data, response_format)[0] == pytest.approx(seconds, rel=0.1)
    assert done["type"] == "speech.audio.done"
    assert done["usage"]["input_tokens"] == len(FIVE_SENTENCES)
    assert done["usage"]["total_tokens"] == len(FIVE_SENTENCES)
    assert done["usage"]["seconds"] == pytest.approx(seconds, abs=0.01)


async def test_sse_through_the_sdk(client: TestClient) -> None:
    async with (
        sdk(client) as api,
        api.audio.speech.with_streaming_response.create(
            model="tts", voice="echo", input=TWO_SENTENCES, response_format="flac", stream_format="sse"
        ) as streamed,
    ):
        lines = [line async for line in streamed.iter_lines()]
    events = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert [e["type"] for e in events][-1] == "speech.audio.done"
    data = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert data.startswith(b"fLaC")
    assert decoded_seconds(data, "flac")[0] == pytest.approx(expected_seconds(TWO_SENTENCES), rel=0.1)


# ------------------------------------------------------------------------------- leaving and failing


class CountingSpeech(FakeEngine):
    """Counts the sentences it was asked for and the ones it finished, across instances of one test."""

    asked: list[int]
    spoken: list[int]

    def synthesize(self, job: SpeechJob, cancel: threading.Event) -> Iterator[Any]:
        self.asked.append(len(job.sentences))
        for samples in super().synthesize(job, cancel):
            self.spoken.append(1)
            yield samples


@pytest.fixture
def counting() -> type[CountingSpeech]:
    class Counting(CountingSpeech):
        asked: list[int] = []  # noqa: RUF012 (one list per test: the class is made per test)
        spoken: list[int] = []  # noqa: RUF012

    return Counting


async def test_a_client_that_leaves_stops_synthesis_and_frees_the_instance(
    start_app: AppFactory, counting: type[CountingSpeech]
) -> None:
    client = await start_app(make_config({"tts": tts_model(token_delay=0.05)}), engines={"fake": counting})
    text = " ".join(f"Sentence {n} of a long text." for n in range(100))
    response = await speak(client, input=text, response_format="pcm")
    assert response.status == 200
    assert await response.content.readany()
    response.close()  # the client hangs up after the first audio
    pool = client.server.app[RUNTIME].pools["tts"]
    await eventually(lambda: pool.instances and all(i.state.value == "idle" for i in pool.instances))
    assert counting.asked == [100]
    assert len(counting.spoken) < 100  # stopped long before the end
    again = await speak(client, input="Still here.", response_format="wav")
    assert again.status == 200
    assert decoded_seconds(await again.read(), "wav")[0] == pytest.approx(expected_seconds("Still here."), rel=0.1)


async def test_a_failure_mid_stream_cuts_the_body_and_the_daemon_keeps_serving(start_app: AppFactory) -> None:
    client = await start_app(make_config({"tts": tts_model(fail_after_tokens=1), "ok": tts_model()}))
    response = await speak(client, input=FIVE_SENTENCES, response_format="mp3")
    assert response.status == 200  # the first sentence was sent before the engine failed
    with pytest.raises(ClientPayloadError):
        await response.read()  # an incomplete body, never a short file that looks whole
    sse = await speak(client, input=FIVE_SENTENCES, response_format="mp3", stream_format="sse")
    events = await sse_data(sse)
    assert events[0]["type"] == "speech.audio.delta"
    assert envelope(events[-1])["code"] == "engine_error"
    ok = await client.post("/v1/audio/speech", json={"model": "ok", "voice": "alloy", "input": "Fine."})
    assert ok.status == 200
    assert await ok.read()


async def test_a_failure_before_any_audio_is_a_status(start_app: AppFactory) -> None:
    client = await start_app(make_config({"tts": tts_model(fail_after_tokens=0)}))
    response = await speak(client, input=TWO_SENTENCES)
    assert response.status == 500
    assert envelope(await response.json())["code"] == "engine_error"


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": "   \n "}, "input"),
        ({"input": "... — !!!"}, "input"),
        ({"input": "x" * 4097}, "input"),
        ({"voice": "nobody"}, "voice"),
        ({"voice": {"name": "alloy"}}, "voice.str"),
        ({"response_format": "ogg"}, "response_format"),
        ({"speed": 0.2}, "speed"),
        ({"speed": 4.5}, "speed"),
        ({"stream_format": "chunks"}, "stream_format"),
        ({"instructions": "Speak like a pirate."}, "instructions"),
        ({"stream": True}, "stream"),
    ],
)
async def test_bad_inputs_are_400s_naming_the_parameter(client: TestClient, body: dict[str, Any], param: str) -> None:
    response = await speak(client, **{"input": "Hello.", **body})
    assert response.status == 400
    error = envelope(await response.json())
    assert error["param"] is not None
    assert error["param"].split(".")[0] == param.split(".", maxsplit=1)[0]


async def test_an_unknown_voice_lists_the_models_voices(client: TestClient) -> None:
    error = envelope(await (await speak(client, input="Hi.", voice="nobody")).json())
    assert "alloy" in error["message"]
    assert "verse" in error["message"]


async def test_a_missing_voice_or_input_is_a_400(client: TestClient) -> None:
    for body, param in (({"model": "tts", "input": "Hi."}, "voice"), ({"model": "tts", "voice": "alloy"}, "input")):
        response = await client.post("/v1/audio/speech", json=body)
        assert response.status == 400
        assert envelope(await response.json())["param"] == param


async def test_ten_thousand_characters_never_reach_the_engine(
    start_app: AppFactory, counting: type[CountingSpeech]
) -> None:
    client = await start_app(make_config({"tts": tts_model()}), engines={"fake": counting})
    response = await speak(client, input="word " * 2000)
    assert response.status == 400
    error = envelope(await response.json())
    assert error["param"] == "input"
    assert "4096" in error["message"]
    assert counting.asked == []
    assert client.server.app[RUNTIME].pools["tts"].instances == []  # nothing was even loaded


async def test_the_sdk_raises_bad_request_naming_the_parameter(client: TestClient) -> None:
    import openai

    async with sdk(client) as api:
        with pytest.raises(openai.BadRequestError) as caught:
            await api.audio.speech.create(model="tts", voice="alloy", input="Hi.", instructions="Whisper it.")
    assert caught.value.param == "instructions"


async def test_wrong_kind_of_model_and_unknown_model(client: TestClient) -> None:
    response = await client.post("/v1/audio/speech", json={"model": "chat", "voice": "alloy", "input": "Hi."})
    assert response.status == 400
    assert envelope(await response.json())["code"] == "unsupported_task"
    response = await client.post("/v1/audio/speech", json={"model": "nope", "voice": "alloy", "input": "Hi."})
    assert response.status == 404
    messages = [{"role": "user", "content": "x"}]
    chat = await client.post("/v1/chat/completions", json={"model": "tts", "messages": messages})
    assert chat.status == 400
    assert envelope(await chat.json())["code"] == "unsupported_task"


# ------------------------------------------------------------------------------------- status, metrics


async def test_status_and_metrics_cover_speech_models(client: TestClient) -> None:
    response = await speak(client, input=TWO_SENTENCES, response_format="flac")
    assert response.status == 200
    await response.read()
    status = await (await client.get("/")).json()
    model = status["models"]["tts"]
    assert model["task"] == "text-to-speech"
    assert model["serves"] == ["speech"]
    assert model["instances"][0]["requests_served"] == 1
    metrics = await (await client.get("/metrics")).text()
    counter = 'lllmsd_speech_audio_seconds_total{model="tts"}'
    line = next(line for line in metrics.splitlines() if line.startswith(counter))
    assert float(line.split()[-1]) == pytest.approx(expected_seconds(TWO_SENTENCES), abs=0.01)
