"""Transcription speed: raw faster-whisper against the same model and settings behind lllmsd.

Speed is given as "x real time" (seconds of audio transcribed per second of wall time; higher is better;
its inverse is the usual real-time factor, RTF). On one ~85 s recording of synthesized speech:
  (a) raw faster-whisper in-process: decode the uploaded bytes and transcribe, one file at a time;
  (b) lllmsd over HTTP, one upload at a time (multipart, response_format json), min_instances 1;
  (c) lllmsd over HTTP, 4 concurrent uploads, max_instances 2 (each instance on threads/2 CPU threads,
      so two instances do not oversubscribe the cores): aggregate speed and the slowest request;
and prints (b)/(a), what the daemon keeps of the engine's speed (target >= 0.9), and the CPU seconds
each spends per second of audio (read from /proc, so steadier than wall time on a shared machine).

The daemon runs in a child process (create_app on 127.0.0.1, a free port) so the client's work is not on
the daemon's event loop. Rounds are interleaved so a neighbour's load hits every figure alike; it prints
the medians of the rounds and the bests (on a shared machine, noise only ever adds time, so the best
round is the closest to the undisturbed speed). Needs espeak-ng (`make system-deps`).

    .venv/bin/python bench/transcription.py [--model whisper-tiny-en] [--rounds 5] [--threads 2] [--beam 5]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from child_daemon import ChildDaemon  # noqa: E402 - bench/ is the script's folder: its sibling module

from tests.setup_models import model_path  # noqa: E402 - needs the checkout on sys.path first
from tests.speech import long_speech  # noqa: E402

CONCURRENT = 4


def model(name: str, threads: int, beam: int, **options: Any) -> dict[str, Any]:
    return {
        "task": "speech-to-text",
        "engine": "faster-whisper",
        "location": str(model_path(name)),
        "compute_type": "int8",
        "beam_size": beam,
        "vad_filter": False,
        "device": {"threads": threads},
        **options,
    }


# ----------------------------------------------------------------------------------------- (a) raw


class RawEngine:
    """faster-whisper in this process, with the settings the daemon's engine uses."""

    def __init__(self, name: str, threads: int, beam: int) -> None:
        from faster_whisper import WhisperModel

        self.beam = beam
        self.model = WhisperModel(
            str(model_path(name)), device="cpu", compute_type="int8", cpu_threads=threads, local_files_only=True
        )

    def seconds(self, audio: bytes) -> tuple[float, float]:
        """(wall, CPU) seconds of one transcription; this process does nothing else meanwhile."""
        started, cpu = time.perf_counter(), time.process_time()
        segments, _ = self.model.transcribe(io.BytesIO(audio), beam_size=self.beam, vad_filter=False)
        text = "".join(s.text for s in segments)  # the segments are lazy: this is where decoding happens
        if not text.strip():
            raise RuntimeError("the raw engine heard nothing")
        return time.perf_counter() - started, time.process_time() - cpu


# ----------------------------------------------------------------------------------- (b), (c) daemon


async def _upload(session: Any, url: str, audio: bytes) -> float:
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("model", "stt")
    form.add_field("file", audio, filename="speech.wav", content_type="audio/wav")
    started = time.perf_counter()
    async with session.post(url, data=form) as response:
        body = await response.text()
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {body}")
    return time.perf_counter() - started


async def _uploads(port: int, audio: bytes, count: int) -> list[float]:
    """``count`` concurrent uploads; each one's wall time, and the total last."""
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/audio/transcriptions"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        started = time.perf_counter()
        each = await asyncio.gather(*(_upload(session, url, audio) for _ in range(count)))
        return [*each, time.perf_counter() - started]


class Daemon(ChildDaemon):
    """lllmsd serving one speech-to-text model ("stt") in a child process."""

    def __init__(self, stt: dict[str, Any]) -> None:
        super().__init__({"stt": stt})

    def uploads(self, audio: bytes, count: int = 1) -> tuple[list[float], float]:
        """Each upload's wall time and the total (last), and the CPU seconds the daemon spent on them."""
        cpu = self.cpu_seconds()
        walls = asyncio.run(_uploads(self.port, audio, count))
        return walls, self.cpu_seconds() - cpu

    def cpu_seconds(self) -> float:
        """User + system CPU time of the daemon process, all its threads (Linux /proc)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------- main


def measure(args: argparse.Namespace, audio: bytes, duration: float) -> None:
    raw = RawEngine(args.model, args.threads, args.beam)
    single = Daemon(model(args.model, args.threads, args.beam, min_instances=1))
    pair = Daemon(
        model(args.model, max(args.threads // 2, 1), args.beam, min_instances=2, max_instances=2),
    )
    figures: dict[str, list[float]] = {k: [] for k in ("a", "b", "c", "c_slowest", "cpu_a", "cpu_b", "cpu_c")}
    try:
        raw.seconds(audio)  # warm-up: first-call allocations, page cache
        single.uploads(audio)
        pair.uploads(audio, 2)
        for round_ in range(1, args.rounds + 1):
            wall, cpu = raw.seconds(audio)
            figures["a"].append(duration / wall)
            figures["cpu_a"].append(cpu / duration)
            walls, cpu = single.uploads(audio)
            figures["b"].append(duration / walls[-1])
            figures["cpu_b"].append(cpu / duration)
            (*each, total), cpu = pair.uploads(audio, CONCURRENT)
            figures["c"].append(CONCURRENT * duration / total)
            figures["c_slowest"].append(max(each))
            figures["cpu_c"].append(cpu / (CONCURRENT * duration))
            print(
                f"round {round_}: (a) {figures['a'][-1]:5.1f}x  (b) {figures['b'][-1]:5.1f}x  "
                f"(c) {figures['c'][-1]:5.1f}x aggregate, slowest request {max(each):5.1f}s;  CPU s per audio s: "
                + "  ".join(f"({k[-1]}) {figures[k][-1]:.3f}" for k in ("cpu_a", "cpu_b", "cpu_c")),
                flush=True,
            )
    finally:
        single.close()
        pair.close()
    print("medians (the typical run) and bests (the least disturbed by neighbours) of the rounds:")
    for label, pick in (("median", statistics.median), ("best", max)):
        a, b, c = (pick(figures[k]) for k in ("a", "b", "c"))
        slowest = statistics.median(figures["c_slowest"]) if label == "median" else min(figures["c_slowest"])
        print(f"[{label}] (a) raw faster-whisper, one file:                 {a:6.1f}x real time (RTF {1 / a:.3f})")
        print(f"[{label}] (b) lllmsd, one upload at a time:                 {b:6.1f}x real time (RTF {1 / b:.3f})")
        print(
            f"[{label}] (c) lllmsd, {CONCURRENT} concurrent uploads, max_instances 2: {c:6.1f}x real time "
            f"aggregate (RTF {1 / c:.3f}), slowest request {slowest:.1f}s"
        )
        print(f"[{label}] (b)/(a) = {b / a:.2f}   (target >= 0.9)", flush=True)
    cpu_a, cpu_b, cpu_c = (statistics.median(figures[k]) for k in ("cpu_a", "cpu_b", "cpu_c"))
    print(
        f"CPU seconds per second of audio (median; steadier than wall time on a busy machine): "
        f"(a) {cpu_a:.3f}  (b) {cpu_b:.3f}  (c) {cpu_c:.3f};  (a)/(b) = {cpu_a / cpu_b:.2f}",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="whisper-tiny-en", choices=["whisper-tiny-en", "whisper-base"])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for (a) and (b); (c) uses half each")
    parser.add_argument("--beam", type=int, default=5, help="beam size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        wav = long_speech(Path(folder))
        audio = wav.read_bytes()
    from faster_whisper.audio import decode_audio

    duration = len(decode_audio(io.BytesIO(audio))) / 16000
    print(
        f"{args.model}, int8, beam {args.beam}, {args.threads} threads; {duration:.1f}s of speech "
        f"({len(audio) / 1e6:.1f} MB wav); {args.rounds} rounds; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    measure(args, audio, duration)
    return 0


if __name__ == "__main__":
    sys.exit(main())
