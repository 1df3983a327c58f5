"""faster-whisper on the real packaged Whisper models (tiny.en, multilingual base), through ModelInstance.

The audio is speech synthesized at test time (tests/speech.py). Each model loads once per module.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lllmsd.core.admission import check_job
from lllmsd.core.instance import InstanceState, ModelInstance
from lllmsd.core.jobs import TranscriptInfo, TranscriptionJob, TranscriptSegment
from lllmsd.engines.faster_whisper import FasterWhisperEngine
from lllmsd.errors import InvalidRequest
from tests.engines.conftest import load_instance, model_config
from tests.setup_models import model_path
from tests.speech import Speech, hears_fox, long_speech, make_speech

MODELS = {"tiny.en": "whisper-tiny-en", "base": "whisper-base"}


def whisper(name: str, **options: Any) -> dict[str, Any]:
    return {"task": "speech-to-text", "engine": "faster-whisper", "location": str(model_path(name)), **options}


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Speech:
    return make_speech(tmp_path_factory.mktemp("speech"))


@pytest.fixture(scope="module")
def instances() -> Iterator[dict[str, ModelInstance]]:
    loaded = {label: asyncio.run(load_instance(whisper(name))) for label, name in MODELS.items()}
    yield loaded
    for instance in loaded.values():
        asyncio.run(instance.dispose())


@pytest.fixture(params=list(MODELS))
def instance(request: pytest.FixtureRequest, instances: dict[str, ModelInstance]) -> ModelInstance:
    return instances[request.param]


async def transcribe(instance: ModelInstance, audio: bytes, **fields: Any) -> tuple[TranscriptInfo, list[Any]]:
    events = [e async for e in instance.transcribe(TranscriptionJob(audio=audio, **fields))]
    info, segments = events[0], events[1:]
    assert isinstance(info, TranscriptInfo)
    assert all(isinstance(s, TranscriptSegment) for s in segments)
    return info, segments


def text_of(segments: list[TranscriptSegment]) -> str:
    return "".join(s.text for s in segments).strip()


# ------------------------------------------------------------------------------------------- hearing


@pytest.mark.parametrize("kind", ["wav", "mp3", "ogg", "flac", "m4a", "webm"])
async def test_hears_the_quick_brown_fox(instance: ModelInstance, speech: Speech, kind: str) -> None:
    info, segments = await transcribe(instance, speech.read(kind), filename=f"fox.{kind}")
    assert hears_fox(text_of(segments)), text_of(segments)
    assert info.language == "en"
    # lossy encoders pad a frame or two at the ends
    assert info.duration == pytest.approx(speech.duration, abs=0.15)


async def test_timestamps_are_python_floats_monotonic_and_inside_the_audio(
    instance: ModelInstance, speech: Speech
) -> None:
    info, segments = await transcribe(instance, speech.read(), word_timestamps=True)
    assert segments
    previous_end = 0.0
    for segment in segments:
        assert type(segment.start) is float
        assert type(segment.end) is float
        assert previous_end <= segment.start <= segment.end <= info.duration
        assert all(type(v) is float for v in (segment.avg_logprob, segment.no_speech_prob, segment.compression_ratio))
        assert segment.tokens
        assert all(type(t) is int for t in segment.tokens)
        previous_end = segment.end
    words = [w for s in segments for w in s.words]
    assert hears_fox(" ".join(w.word.strip() for w in words))
    previous = 0.0
    for word in words:
        assert type(word.start) is float
        assert type(word.probability) is float
        assert previous <= word.start <= word.end <= info.duration
        previous = word.start


async def test_words_only_when_asked_for(instance: ModelInstance, speech: Speech) -> None:
    _, segments = await transcribe(instance, speech.read())
    assert segments
    assert all(s.words == () for s in segments)


async def test_temperature_and_prompt_are_accepted(instance: ModelInstance, speech: Speech) -> None:
    _, segments = await transcribe(instance, speech.read(), temperature=0.0, prompt="A pangram about a fox.")
    assert "fox" in text_of(segments).lower()


async def test_translation_on_the_multilingual_model(instances: dict[str, ModelInstance], speech: Speech) -> None:
    info, segments = await transcribe(instances["base"], speech.french_wav.read_bytes(), language="fr", translate=True)
    english = text_of(segments).lower()
    assert info.language == "fr"
    assert "music" in english
    assert "musique" not in english  # translated, not transcribed


async def test_french_is_transcribed_in_french_by_base(instances: dict[str, ModelInstance], speech: Speech) -> None:
    _, segments = await transcribe(instances["base"], speech.french_wav.read_bytes(), language="fr")
    assert "musique" in text_of(segments).lower()


# ------------------------------------------------------------------------------------------- refusals


async def assert_refused(instance: ModelInstance, audio: bytes, param: str, *words: str, **fields: Any) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await transcribe(instance, audio, **fields)
    assert caught.value.param == param
    for word in words:
        assert word in caught.value.message
    assert instance.state is InstanceState.IDLE  # a bad request does not cost the instance
    assert instance.error is None


async def test_english_only_model_refuses_translation_and_other_languages(
    instances: dict[str, ModelInstance], speech: Speech
) -> None:
    tiny = instances["tiny.en"]
    await assert_refused(tiny, speech.read(), "model", "English-only", translate=True)
    await assert_refused(tiny, speech.read(), "language", "'fr'", language="fr")
    _, segments = await transcribe(tiny, speech.read(), language="en")
    assert hears_fox(text_of(segments)), text_of(segments)


@pytest.mark.parametrize(
    ("audio", "filename"),
    [
        (b"this is a text file, not a recording\n" * 20, "notes.txt"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(40), "broken.wav"),
    ],
)
async def test_undecodable_upload_is_a_400_naming_the_file(
    instance: ModelInstance, audio: bytes, filename: str
) -> None:
    await assert_refused(instance, audio, "file", filename, filename=filename)


def test_unknown_language_is_refused_before_any_work() -> None:
    config = model_config(whisper("whisper-tiny-en"))
    with pytest.raises(InvalidRequest) as caught:
        check_job(FasterWhisperEngine, config, TranscriptionJob(audio=b"x", language="xx"))
    assert caught.value.param == "language"
    assert "'xx'" in caught.value.message
    check_job(FasterWhisperEngine, config, TranscriptionJob(audio=b"x", language="de"))


def test_loads_only_from_the_local_folder(tmp_path: Path) -> None:
    """A folder without a model is an error about that folder, never a download attempt."""
    config = model_config(whisper("whisper-tiny-en"))
    from lllmsd.engines.base import ModelFiles

    with pytest.raises(Exception, match=str(tmp_path)):
        FasterWhisperEngine(config, ModelFiles(tmp_path))


# --------------------------------------------------------------------------------------- cancellation


async def test_closing_the_stream_stops_decoding_and_frees_the_instance(
    instances: dict[str, ModelInstance], tmp_path: Path
) -> None:
    tiny = instances["tiny.en"]
    audio = long_speech(tmp_path).read_bytes()  # ~90 s: three 30 s windows at least
    engine = tiny._engine
    produced: list[Any] = []
    seen_cancel: list[threading.Event] = []
    original = type(engine).transcribe

    def counting(job: TranscriptionJob, cancel: threading.Event) -> Iterator[Any]:
        # observe what the real engine produces; the events themselves are untouched
        seen_cancel.append(cancel)
        for event in original(engine, job, cancel):
            produced.append(event)
            yield event

    engine.transcribe = counting
    try:
        async with contextlib.aclosing(tiny.transcribe(TranscriptionJob(audio=audio))) as events:
            async for event in events:
                if isinstance(event, TranscriptSegment):
                    break  # the client is gone after the first segment
    finally:
        del engine.transcribe
    assert seen_cancel[0].is_set()
    info, segments = produced[0], produced[1:]
    assert isinstance(info, TranscriptInfo)
    assert info.duration > 75
    # The worker runs ahead of the consumer, so a few more segments of the window being decoded may
    # have been queued; but it had stopped when aclose returned, and the last window was never decoded.
    assert segments
    assert max(s.end for s in segments) < info.duration - 20
    assert tiny.state is InstanceState.IDLE
    _, again = await transcribe(tiny, audio[: len(audio) // 8])
    assert again
