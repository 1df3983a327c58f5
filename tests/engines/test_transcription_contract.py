"""faster-whisper on the real packaged Whisper models (tiny.en, multilingual base), through ModelInstance.

The audio is speech synthesized at test time (tests/speech.py). Each model loads once per module.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import pytest

from lllmsd.config import ConfigError, parse_config
from lllmsd.core.admission import check_job
from lllmsd.core.instance import InstanceState, ModelInstance
from lllmsd.core.jobs import TranscriptInfo, TranscriptionJob, TranscriptSegment
from lllmsd.engines import faster_whisper
from lllmsd.engines.base import ModelFiles
from lllmsd.engines.faster_whisper import FasterWhisperEngine
from lllmsd.errors import InvalidRequest
from tests.engines.conftest import engine_of, load_instance, model_config
from tests.setup_models import model_path
from tests.speech import LONG_TEXT, Speech, hears_fox, long_speech, make_speech

MODELS = {"tiny.en": "whisper-tiny-en", "base": "whisper-base"}


def whisper(name: str, **options: Any) -> dict[str, Any]:
    return {"task": "speech-to-text", "engine": "faster-whisper", "location": str(model_path(name)), **options}


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Speech:
    return make_speech(tmp_path_factory.mktemp("speech"))


@pytest.fixture(scope="module")
def instances() -> Iterator[dict[str, ModelInstance]]:
    loaded = {label: asyncio.run(load_instance(whisper(name), isolation="thread")) for label, name in MODELS.items()}
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
    engine = engine_of(tiny)
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


# ---------------------------------------------------------------------------- long audio: the limit


HOUR = 3600
LIMIT = 1800  # max_audio_seconds of the limited model below: half the hour


@pytest.fixture(scope="module")
def silent_hour(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An hour of silence as FLAC: about 190 KB that decode to 3600 s (the issue's 96 KB file holds as much)."""
    path = tmp_path_factory.mktemp("long") / "silence.flac"
    subprocess.run(["sox", "-n", "-r", "16000", "-c", "1", str(path), "trim", "0", str(HOUR)], check=True)
    return path


@pytest.fixture(scope="module")
def undeclared_hour(silent_hour: Path) -> Path:
    """The same hour with FLAC's "total samples" zeroed (what a streaming encoder writes): the container
    declares no duration, so only decoding can tell how long it is."""
    data = bytearray(silent_hour.read_bytes())
    assert data[:4] == b"fLaC"
    # STREAMINFO starts at byte 8; its 36-bit sample count is the low nibble of byte 21 and bytes 22-25
    data[21] &= 0xF0
    data[22:26] = bytes(4)
    path = silent_hour.with_name("undeclared.flac")
    path.write_bytes(bytes(data))
    return path


def declared_duration(path: Path) -> float | None:
    with av.open(str(path)) as container:
        return faster_whisper.declared_seconds(container)


@pytest.fixture(scope="module")
def limited_engine() -> Iterator[FasterWhisperEngine]:
    """tiny.en with max_audio_seconds: 1800 and greedy decoding, called directly on the test's thread (so
    the tests can watch what it decodes)."""
    config = model_config(whisper("whisper-tiny-en", max_audio_seconds=LIMIT, beam_size=1))
    engine = FasterWhisperEngine(config, ModelFiles(model_path("whisper-tiny-en")))
    yield engine
    engine.close()


def run_engine(engine: FasterWhisperEngine, audio: bytes, **fields: Any) -> list[Any]:
    return list(engine.transcribe(TranscriptionJob(audio=audio, **fields), threading.Event()))


def test_max_audio_seconds_is_a_speech_to_text_option() -> None:
    assert model_config(whisper("whisper-tiny-en")).max_audio_seconds == 7200  # two hours by default
    with pytest.raises(ConfigError, match=r"max_audio_seconds.*only speech-to-text models"):
        parse_config({"models": {"chat": {"task": "text-completion", "engine": "fake", "max_audio_seconds": 60}}})


async def test_audio_over_max_audio_seconds_is_refused_from_its_declared_duration(silent_hour: Path) -> None:
    assert declared_duration(silent_hour) == HOUR
    audio = await asyncio.to_thread(silent_hour.read_bytes)
    limited = await load_instance(whisper("whisper-tiny-en", max_audio_seconds=LIMIT))
    try:
        # through an instance, as a request is: a 400 on "file", and the instance serves on
        await assert_refused(
            limited,
            audio,
            "file",
            "silence.flac",
            f"{LIMIT}-second",
            "max_audio_seconds",
            filename="silence.flac",
        )
    finally:
        await limited.dispose()


def test_audio_over_max_audio_seconds_is_refused_while_decoding(
    limited_engine: FasterWhisperEngine, undeclared_hour: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a declared duration, decoding stops as soon as the audio passes the limit: the second
    half of the hour is never decoded, and nothing is transcribed."""
    assert declared_duration(undeclared_hour) is None
    decoded = [0.0]
    frames = faster_whisper.audio_frames

    def counting(container: Any) -> Iterator[Any]:
        for frame in frames(container):
            decoded[0] += frame.samples / frame.sample_rate
            yield frame

    monkeypatch.setattr(faster_whisper, "audio_frames", counting)
    monkeypatch.setattr(limited_engine.model, "transcribe", lambda *a, **k: pytest.fail("transcribed"))
    with pytest.raises(InvalidRequest) as caught:
        run_engine(limited_engine, undeclared_hour.read_bytes(), filename="undeclared.flac")
    assert caught.value.param == "file"
    assert "max_audio_seconds" in caught.value.message
    assert "undeclared.flac" in caught.value.message
    print(f"decoded {decoded[0]:.1f} s of the hour before refusing")
    assert LIMIT < decoded[0] < LIMIT + 1  # one FLAC frame past the limit, not the hour


# -------------------------------------------------------------------------- long audio: the memory

# Run in a fresh interpreter so that nothing else this session loaded or decoded counts. The peak is
# VmHWM, the high-water mark of the process's own memory: on Linux ru_maxrss would start from the
# parent's size at exec (pytest's, with its loaded models), and hide a smaller rise.
RSS_SCRIPT = """
import json, resource, sys, threading
from pathlib import Path
from lllmsd.config import parse_config
from lllmsd.core.jobs import TranscriptionJob
from lllmsd.engines.base import ModelFiles
from lllmsd.engines.faster_whisper import FasterWhisperEngine

def peaks():
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmHWM"].split()[0]), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB

folder, audio = Path(sys.argv[1]), Path(sys.argv[2]).read_bytes()
model = {"task": "speech-to-text", "engine": "faster-whisper", "location": str(folder)}
engine = FasterWhisperEngine(parse_config({"models": {"m": model}}).models["m"], ModelFiles(folder))
loaded = peaks()
events = list(engine.transcribe(TranscriptionJob(audio=audio, filename="silence.flac"), threading.Event()))
done = peaks()
print(json.dumps({"loaded_kib": loaded[0], "rise_kib": done[0] - loaded[0], "maxrss_kib": [loaded[1], done[1]],
                  "duration": events[0].duration, "segments": [[e.id, e.start, e.end] for e in events[1:]]}))
"""


def test_an_hour_of_silence_is_transcribed_in_bounded_memory(silent_hour: Path) -> None:
    """faster-whisper on the whole hour at once raised peak RSS by 3.3 GB; windows keep it to one window."""
    done = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(model_path("whisper-tiny-en")), str(silent_hour)],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rise = result["rise_kib"] / 1024
    loaded = result["loaded_kib"] / 1024
    maxrss = [kib / 1024 for kib in result["maxrss_kib"]]
    print(
        f"peak RSS rose by {rise:.0f} MiB transcribing an hour (peak after loading {loaded:.0f} MiB; "
        f"ru_maxrss {maxrss[0]:.0f} -> {maxrss[1]:.0f} MiB)"
    )
    assert rise < 1024
    assert result["duration"] == pytest.approx(HOUR, abs=0.1)
    segments = result["segments"]
    assert [s[0] for s in segments] == list(range(len(segments)))
    times = [0.0] + [t for s in segments for t in s[1:]]
    assert times == sorted(times)
    assert times[-1] <= HOUR


# --------------------------------------------------------------------- long audio: across windows


def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def test_speech_is_heard_whole_across_a_window_boundary(
    limited_engine: FasterWhisperEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 30 s windows, ~84 s of speech takes two or three windows: the transcript is the one a single
    window gives (nothing lost or repeated at the cut), with ids, seek and timestamps running on."""
    audio = long_speech(tmp_path).read_bytes()
    whole = run_engine(limited_engine, audio, word_timestamps=True)  # one window: the file is under 330 s
    calls: list[dict[str, Any]] = []
    transcribe = limited_engine.model.transcribe

    def watching(samples: Any, **options: Any) -> Any:
        calls.append({"seconds": samples.size / faster_whisper.SAMPLE_RATE, **options})
        return transcribe(samples, **options)

    monkeypatch.setattr(limited_engine.model, "transcribe", watching)
    monkeypatch.setattr(faster_whisper, "WINDOW_SECONDS", 30)
    events = run_engine(limited_engine, audio, word_timestamps=True)

    assert len(calls) >= 2, calls
    assert calls[0]["seconds"] == 30
    assert calls[0]["language"] is None
    assert calls[0]["initial_prompt"] is None
    for later in calls[1:]:
        assert later["language"] == "en"  # found on the first window, not detected again
        assert isinstance(later["initial_prompt"], list)
        assert later["initial_prompt"]  # the text so far, as tokens
    info, segments = events[0], events[1:]
    assert isinstance(info, TranscriptInfo)
    assert info.duration == whole[0].duration
    assert [s.id for s in segments] == list(range(len(segments)))
    assert [s.seek for s in segments] == sorted(s.seek for s in segments)
    assert max(s.seek for s in segments) > 30 * 100  # segments of the later windows, moved to their place
    previous = 0.0
    for segment in segments:
        assert previous <= segment.start <= segment.end <= info.duration
        previous = segment.end
    times = [t for s in segments for w in s.words for t in (w.start, w.end)]
    assert times == sorted(times)
    assert segments[-1].end > info.duration - 10
    windowed, single, spoken = words_of(text_of(segments)), words_of(text_of(whole[1:])), words_of(LONG_TEXT)

    def similarity(a: list[str], b: list[str]) -> float:
        return difflib.SequenceMatcher(a=a, b=b, autojunk=False).ratio()

    print(
        f"{len(calls)} windows; {len(windowed)} words against {len(single)} in one window, similarity "
        f"{similarity(single, windowed):.3f}; to the text spoken: {similarity(spoken, windowed):.3f} "
        f"(one window: {similarity(spoken, single):.3f})"
    )
    assert similarity(single, windowed) > 0.9, (text_of(segments), text_of(whole[1:]))
    assert abs(len(windowed) - len(single)) <= 5  # nothing lost or said twice at the cut
    assert similarity(spoken, windowed) > similarity(spoken, single) - 0.05
