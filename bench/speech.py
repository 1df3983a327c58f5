"""Speech synthesis speed: Piper in-process against the same voice, on the same threads, behind lllmsd.

Two figures for one paragraph of several sentences (the en_US-joe-medium voice, both noise scales 0 so
every run synthesizes the same audio):
  - speed as "x real time": seconds of audio produced per second of wall time (higher is better; its
    inverse is the real-time factor, RTF);
  - time to first byte: from the request (or the call) to the first audio.
Measured for
  (a) piper-tts in this process: ``PiperVoice.synthesize`` (which splits sentences itself) on an
      onnxruntime session with the same intra-op thread count; the first chunk is the first sentence;
  (b) lllmsd over HTTP, ``response_format: pcm`` (24 kHz, resampled, no codec), streamed;
  (c) lllmsd over HTTP, ``response_format: mp3`` (encoded with LAME in the worker), streamed;
and prints (b)/(a) for both figures: what the daemon keeps of the engine's speed (target >= 0.9).

The daemon runs in a child process (bench/child_daemon.py) with min_instances 1, so no load is timed.
Rounds are interleaved so a neighbour's load hits every figure alike; the medians and the bests of the
rounds are printed (noise on a shared machine only ever adds time).

    .venv/bin/python bench/speech.py [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from child_daemon import ChildDaemon  # noqa: E402 - bench/ is the script's folder: its sibling module

from tests.setup_models import model_path  # noqa: E402 - needs the checkout on sys.path first

PARAGRAPH = (
    "A local model daemon keeps a pool of loaded instances for every model it serves. "
    "When a request arrives, the pool hands out an idle instance or loads a new one. "
    "Speech synthesis turns this paragraph into audio, one sentence at a time. "
    "The first sentence is sent to the client while the next one is still being spoken. "
    "Benchmarks compare the engine on its own with the same engine behind the daemon. "
    "The ratio between the two tells how much the daemon costs."
)
PCM_RATE = 24_000


def voice_model(threads: int) -> dict[str, Any]:
    return {
        "task": "text-to-speech",
        "engine": "piper",
        "location": str(model_path("piper-joe")),
        "device": {"threads": threads},
        "noise_scale": 0,
        "noise_w_scale": 0,
        "min_instances": 1,
    }


# ----------------------------------------------------------------------------------------- (a) raw


class RawPiper:
    """piper-tts in this process, on a session with ``threads`` intra-op threads."""

    def __init__(self, threads: int) -> None:
        import onnxruntime
        from piper import PiperConfig, PiperVoice, SynthesisConfig

        folder = model_path("piper-joe")
        onnx = next(folder.glob("*.onnx"))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
        config = PiperConfig.from_dict(json.loads(onnx.with_name(onnx.name + ".json").read_text()))
        self.voice = PiperVoice(session=session, config=config)
        self.options = SynthesisConfig(noise_scale=0, noise_w_scale=0)

    def run(self, text: str) -> tuple[float, float, float]:
        """(seconds of audio, wall seconds, seconds to the first chunk)."""
        started = time.perf_counter()
        first = None
        samples = 0
        for chunk in self.voice.synthesize(text, syn_config=self.options):
            if first is None:
                first = time.perf_counter() - started
            samples += len(chunk.audio_int16_array)
        wall = time.perf_counter() - started
        return samples / self.voice.config.sample_rate, wall, first or wall


# --------------------------------------------------------------------------------------- (b), (c)


async def _speak(port: int, text: str, response_format: str) -> tuple[bytes, float, float]:
    import aiohttp

    body = {"model": "voice", "voice": "alloy", "input": text, "response_format": response_format}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        started = time.perf_counter()
        first = None
        pieces = []
        async with session.post(f"http://127.0.0.1:{port}/v1/audio/speech", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"{response.status}: {await response.text()}")
            async for piece in response.content.iter_any():
                if first is None:
                    first = time.perf_counter() - started
                pieces.append(piece)
        wall = time.perf_counter() - started
    return b"".join(pieces), wall, first or wall


def audio_seconds(data: bytes, response_format: str) -> float:
    if response_format == "pcm":
        return len(data) / 2 / PCM_RATE
    from tests.speech import decoded_seconds

    return decoded_seconds(data, response_format)[0]


def through_daemon(daemon: ChildDaemon, text: str, response_format: str) -> tuple[float, float, float]:
    data, wall, first = asyncio.run(_speak(daemon.port, text, response_format))
    return audio_seconds(data, response_format), wall, first


# --------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads for both")
    args = parser.parse_args()
    print(
        f"piper en_US-joe-medium, {args.threads} thread(s), noise 0; {len(PARAGRAPH)} characters, "
        f"6 sentences; {args.rounds} rounds; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    raw = RawPiper(args.threads)
    daemon = ChildDaemon({"voice": voice_model(args.threads)})
    runs = {"a": lambda: raw.run(PARAGRAPH)}
    runs["b"] = lambda: through_daemon(daemon, PARAGRAPH, "pcm")
    runs["c"] = lambda: through_daemon(daemon, PARAGRAPH, "mp3")
    speed: dict[str, list[float]] = {k: [] for k in runs}
    ttfb: dict[str, list[float]] = {k: [] for k in runs}
    try:
        for run in runs.values():  # warm-up: first-call allocations, page cache
            run()
        for round_ in range(1, args.rounds + 1):
            line = []
            for key, run in runs.items():
                seconds, wall, first = run()
                speed[key].append(seconds / wall)
                ttfb[key].append(first)
                line.append(f"({key}) {seconds / wall:5.1f}x, first audio {first * 1000:6.0f} ms")
            print(f"round {round_}: " + ";  ".join(line), flush=True)
    finally:
        daemon.close()
    names = {
        "a": "piper in-process              ",
        "b": "lllmsd, pcm over HTTP         ",
        "c": "lllmsd, mp3 over HTTP         ",
    }
    for label, pick_speed, pick_time in (("median", statistics.median, statistics.median), ("best", max, min)):
        for key, name in names.items():
            x = pick_speed(speed[key])
            print(
                f"[{label}] ({key}) {name} {x:6.1f}x real time (RTF {1 / x:.3f}), "
                f"first audio {pick_time(ttfb[key]) * 1000:6.0f} ms"
            )
        a, b = pick_speed(speed["a"]), pick_speed(speed["b"])
        print(
            f"[{label}] (b)/(a) speed = {b / a:.2f} (target >= 0.9); time to first audio (a)/(b) = "
            f"{pick_time(ttfb['a']) / pick_time(ttfb['b']):.2f}",
            flush=True,
        )
    print(f"load average after: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
