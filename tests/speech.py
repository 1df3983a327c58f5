"""Speech made at test time with espeak-ng, converted with sox: the audio the transcription tests hear.

What a model hears in espeak's voice moves with the CPU (CTranslate2's int8 kernels differ between
instruction sets: base hears "quick round fox" on one machine and "quick brown fox" on another), so tests
judge hearing by ``hears_fox``: most of the sentence's words, the key ones included, not one exact phrase.
If espeak-ng or sox is missing the tests fail loudly (``make system-deps`` installs them): a skipped
transcription suite would look green while proving nothing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

FOX = "The quick brown fox jumps over the lazy dog."
FOX_WORDS = frozenset({"the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"})
KEY_WORDS = ("quick", "fox")
FRENCH = "J'aime beaucoup la musique."
VOICE = ("-v", "en+f3", "-s", "150")
FRENCH_VOICE = ("-v", "fr", "-s", "130")


def hears_fox(text: str) -> bool:
    """Whether a transcript is the fox sentence: at least 4 of its 8 distinct words, quick and fox among
    them ("the quick round fox jump over the lazy dog" and "the quick brown fox jump so we're going to
    raise it on" are both what tiny or base hear on some CPU; "a cat sat on the mat" is not)."""
    heard = set(re.findall(r"[a-z]+", text.lower()))
    return len(FOX_WORDS & heard) >= 4 and all(word in heard for word in KEY_WORDS)


@dataclass(frozen=True)
class Speech:
    wav: Path
    mp3: Path
    ogg: Path
    flac: Path
    m4a: Path
    webm: Path
    french_wav: Path
    duration: float  # seconds, of the English sentence

    def read(self, kind: str = "wav") -> bytes:
        return getattr(self, kind).read_bytes()


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(
            f"{name} is not installed: run `make system-deps` (apt-get install espeak-ng sox libsox-fmt-mp3)"
        )
    return path


def _run(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr[-1000:]}")
    return done.stdout


def make_speech(folder: Path, text: str = FOX) -> Speech:
    """Synthesize ``text`` (and the French sentence) into ``folder`` as wav, mp3 and ogg."""
    espeak, sox = _tool("espeak-ng"), _tool("sox")
    wav = folder / "speech.wav"
    _run(espeak, *VOICE, "-w", str(wav), text)
    sox_made = {kind: folder / f"speech.{kind}" for kind in ("mp3", "ogg", "flac")}
    for path in sox_made.values():
        _run(sox, str(wav), str(path))
    m4a, webm = folder / "speech.m4a", folder / "speech.webm"
    encode(wav, m4a, "ipod", "aac", 22050)  # AAC in MP4, what phones record
    encode(wav, webm, "webm", "libopus", 48000)  # Opus in WebM, what browsers record
    french = folder / "french.wav"
    _run(espeak, *FRENCH_VOICE, "-w", str(french), FRENCH)
    duration = float(_run(_tool("soxi"), "-D", str(wav)).strip())
    return Speech(wav=wav, **sox_made, m4a=m4a, webm=webm, french_wav=french, duration=duration)


def encode(source: Path, target: Path, container: str, codec: str, rate: int) -> None:
    """Re-encode with PyAV's bundled FFmpeg (sox has no AAC or WebM)."""
    import av

    with av.open(str(source)) as inp, av.open(str(target), "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        resampler = av.AudioResampler(format=stream.codec_context.format or "fltp", layout="mono", rate=rate)
        frames = [*inp.decode(audio=0), None]  # None flushes the resampler
        for frame in frames:
            for resampled in resampler.resample(frame):
                out.mux(stream.encode(resampled))
        out.mux(stream.encode(None))


# Distinct sentences: repeated text makes Whisper's compression-ratio check fail, and the random
# temperature fallback that follows can drop whole windows.
LONG_TEXT = (
    "The quick brown fox jumps over the lazy dog. "
    "A local model daemon keeps a pool of loaded instances for every model it serves. "
    "When a request arrives, the pool hands out an idle instance or loads a new one. "
    "Speech recognition turns this recording back into text, one window of thirty seconds at a time. "
    "Every window is decoded with a beam search, and the segments come out with their timestamps. "
    "On a small machine with two cores, the tiny English model runs many times faster than real time. "
    "The base model understands many languages and can translate them into English. "
    "Clients talk to the daemon with the official software development kit, as if it were the cloud. "
    "Uploads larger than twenty five megabytes are refused before they are read to the end. "
    "A file that is not audio gets a clear error that names the file. "
    "Subtitles come out in two formats, with times that never go backwards. "
    "Streaming clients receive the text segment by segment, followed by a final event. "
    "When a client disconnects, decoding stops and the instance is free for the next request. "
    "Benchmarks compare the engine on its own with the same engine behind the daemon. "
    "The ratio between the two tells how much the daemon costs. "
    "Four uploads at once share two instances, and the rest wait in line."
)


def long_speech(folder: Path) -> Path:
    """About ninety seconds of distinct sentences: several 30 s windows, for cancellation and benchmarks."""
    out = folder / "long.wav"
    _run(_tool("espeak-ng"), *VOICE, "-w", str(out), LONG_TEXT)
    return out


# ------------------------------------------------------------------------------------------ speaking


def word_recall(said: str, heard: str) -> float:
    """The share of the words of ``said`` that are among the words ``heard`` (case and punctuation aside)."""
    expected = re.findall(r"[a-z0-9]+", said.lower())
    found = set(re.findall(r"[a-z0-9]+", heard.lower()))
    return sum(word in found for word in expected) / len(expected)


PCM_RATE = 24_000  # OpenAI's pcm: raw 16-bit little-endian mono at 24 kHz


def decoded_seconds(data: bytes, response_format: str) -> tuple[float, int]:
    """(seconds, sample rate) of an audio file as PyAV decodes it, every frame counted (a streamed file's
    header may not say its length). ``pcm`` has no header: it is read as 16-bit mono at 24 kHz."""
    import io

    import av

    options = {"format": "s16le", "options": {"sample_rate": str(PCM_RATE), "ch_layout": "mono"}}
    samples, rate = 0, 0
    with av.open(io.BytesIO(data), **(options if response_format == "pcm" else {})) as container:
        for frame in container.decode(audio=0):
            samples += frame.samples
            rate = frame.sample_rate
    return samples / rate, rate
