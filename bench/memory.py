"""Memory: what the daemon really holds beside what its budget estimated, idle and after mixed traffic,
and what a quantized KV cache saves.

  1. `lllmsd serve` with SmolLM2 (llama-cpp), all-MiniLM-L6-v2 (sentence-transformers) and Whisper tiny.en
     (faster-whisper), one instance each loaded at start (min_instances). The daemon's RSS and each
     instance's worker RSS beside the budget's estimate of it (and where that came from), once idle and
     again after N mixed requests (chat, embeddings, transcriptions of a spoken sentence) at 4 at a time.
  2. SmolLM2 at context 8192 with cache_type_k/v f16 and q8_0 (flash attention, which a quantized V cache
     needs): llama.cpp's own KV buffer, the estimate's KV term and total, and the worker's RSS after load.

Run: .venv/bin/python bench/memory.py [--requests 1000]
Needs espeak-ng for the spoken sentence (`make system-deps`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from pool_overhead import Daemon  # bench/ is the script's folder: its sibling module

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MIB = 2**20
SENTENCE = "The quick brown fox jumps over the lazy dog."

from tests.setup_models import model_path  # noqa: E402  (after the path is set)


def models() -> dict[str, Any]:
    threads = {"threads": 1, "batch_threads": 1}
    return {
        "smollm2": {
            "task": "text-completion",
            "engine": "llama-cpp",
            "location": str(model_path("smollm2")),
            "context_size": 4096,
            "min_instances": 1,
            "device": threads,
        },
        "minilm": {
            "task": "embedding",
            "engine": "sentence-transformers",
            "location": str(model_path("minilm")),
            "min_instances": 1,
            "device": {"threads": 1},
        },
        "whisper": {
            "task": "speech-to-text",
            "engine": "faster-whisper",
            "location": str(model_path("whisper-tiny-en")),
            "min_instances": 1,
            "device": {"threads": 1},
        },
    }


def kv_models() -> dict[str, Any]:
    base = {
        "task": "text-completion",
        "engine": "llama-cpp",
        "location": str(model_path("smollm2")),
        "context_size": 8192,
        "min_instances": 1,
        "flash_attn": True,
        "device": {"threads": 1, "batch_threads": 1},
    }
    return {
        "kv-f16": {**base, "cache_type_k": "f16", "cache_type_v": "f16"},
        "kv-q8_0": {**base, "cache_type_k": "q8_0", "cache_type_v": "q8_0"},
    }


# three engines to import: on a busy machine the daemon takes longer than Daemon's default to listen
START_SECONDS = 600.0


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def status(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(f"{url}/") as response:
        return await response.json()


async def until_loaded(session: aiohttp.ClientSession, url: str, names: list[str]) -> dict[str, Any]:
    for _ in range(1200):
        body = await status(session, url)
        if all(any(i["state"] == "idle" for i in body["models"][m]["instances"]) for m in names):
            return body
        await asyncio.sleep(0.25)
    raise RuntimeError("the models did not load")


def report(title: str, daemon_pid: int, body: dict[str, Any]) -> None:
    print(f"\n{title}")
    print(f"  {'instance':<14} {'RSS MiB':>8} {'PSS MiB':>8} {'estimate MiB':>13}  source")
    total = daemon = rss(daemon_pid)
    print(f"  {'daemon':<14} {daemon / MIB:>8.0f}")
    for model in body["models"].values():
        for instance in model["instances"]:
            worker = instance["worker"] or {}
            total += worker.get("rss_bytes", 0)
            estimate = (instance["memory_estimate_bytes"] or 0) / MIB
            resident, proportional = worker.get("rss_bytes", 0) / MIB, worker.get("pss_bytes", 0) / MIB
            source = instance["memory_estimate_source"]
            print(f"  {instance['id']:<14} {resident:>8.0f} {proportional:>8.0f} {estimate:>13.0f}  {source}")
    memory = body["memory"]
    used, budget = memory["used_bytes"] / MIB, memory["budget_bytes"] / MIB
    print(f"  {'all':<14} {total / MIB:>8.0f} {'':>8} {used:>13.0f}  (budget {budget:.0f} MiB)")


def speech(folder: Path) -> bytes:
    wav = folder / "fox.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), SENTENCE], check=True, capture_output=True)
    return wav.read_bytes()


async def one(session: aiohttp.ClientSession, url: str, kind: str, n: int, audio: bytes) -> None:
    if kind == "chat":
        body = {"model": "smollm2", "messages": [{"role": "user", "content": f"Say hello {n}"}], "max_tokens": 8}
        async with session.post(f"{url}/v1/chat/completions", json=body) as response:
            assert response.status == 200, await response.text()
    elif kind == "embedding":
        body = {"model": "minilm", "input": [f"sentence {n}", "another sentence"]}
        async with session.post(f"{url}/v1/embeddings", json=body) as response:
            assert response.status == 200, await response.text()
    else:
        form = aiohttp.FormData()
        form.add_field("model", "whisper")
        form.add_field("file", audio, filename="fox.wav", content_type="audio/wav")
        async with session.post(f"{url}/v1/audio/transcriptions", data=form) as response:
            assert response.status == 200, await response.text()


async def mixed(session: aiohttp.ClientSession, url: str, requests: int, audio: bytes) -> float:
    kinds = itertools.cycle(["chat", "embedding", "embedding", "transcription", "chat", "embedding"])
    work = [(next(kinds), n) for n in range(requests)]
    queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)

    async def client() -> None:
        while not queue.empty():
            kind, n = queue.get_nowait()
            await one(session, url, kind, n, audio)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(4)))
    return time.perf_counter() - start


async def bench_three_models(requests: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        audio = speech(Path(folder))
    daemon = Daemon(models(), concurrency=2, start_seconds=START_SECONDS)
    async with daemon as url, aiohttp.ClientSession() as session:
        assert daemon.process is not None
        body = await until_loaded(session, url, ["smollm2", "minilm", "whisper"])
        for kind in ("chat", "embedding", "transcription"):  # each engine once: first-call buffers
            await one(session, url, kind, 0, audio)
        report("1. three models loaded, idle (after one request each)", daemon.process.pid, await status(session, url))
        seconds = await mixed(session, url, requests, audio)
        body = await status(session, url)
        report(f"   after {requests} mixed requests ({seconds:.0f} s, 4 at a time)", daemon.process.pid, body)


async def bench_kv_cache() -> None:
    daemon = Daemon(kv_models(), concurrency=2, start_seconds=START_SECONDS)
    async with daemon as url, aiohttp.ClientSession() as session:
        body = await until_loaded(session, url, ["kv-f16", "kv-q8_0"])
    print("\n2. SmolLM2, context 8192, flash attention: the KV cache type")
    columns = ("llama.cpp KV MiB", "estimate KV MiB", "estimate MiB", "RSS after load MiB")
    print(f"  {'cache':<8} " + " ".join(f"{c:>{len(c) + 1}}" for c in columns))
    from lllmsd.config import parse_config
    from lllmsd.engines.base import ModelFiles
    from lllmsd.engines.llama_cpp.memory import gguf_estimate

    configs = parse_config({"models": kv_models()}).models
    for name in ("kv-f16", "kv-q8_0"):
        (instance,) = body["models"][name]["instances"]
        estimate = gguf_estimate(configs[name], ModelFiles(model_path("smollm2")), embedding=False)
        kv = instance["placement"]["buffers"]["CPU KV"]
        print(
            f"  {name.removeprefix('kv-'):<8} {kv / MIB:>17.1f} {estimate.kv_cache / MIB:>16.1f}"
            f" {estimate.total / MIB:>13.0f} {instance['worker']['rss_bytes'] / MIB:>19.0f}"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    await bench_three_models(args.requests)
    await bench_kv_cache()
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    asyncio.run(main())
