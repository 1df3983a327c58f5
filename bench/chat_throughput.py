"""Chat throughput on SmolLM2: llama-cpp-python in-process vs its own server vs lllmsd over HTTP.

Each backend answers the same chat request (greedy, ``--max-tokens`` tokens) ``--runs`` times after one
warm-up; the figure is completion tokens per second of wall time per request (prompt evaluation included;
the repeated prompt is cached by all three). Prints the median per backend and its ratio to in-process.

  (a) llama-cpp-python in-process: ``Llama.create_chat_completion``
  (b) ``python -m llama_cpp.server`` over HTTP (skipped unless ``llama-cpp-python[server]`` is installed)
  (c) ``lllmsd serve`` over HTTP with the llama-cpp engine

Run: .venv/bin/python bench/chat_throughput.py [--runs 5] [--max-tokens 64] [--threads 1]
The machine's other load changes the figures a lot (ggml threads spin-wait): compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from pool_overhead import Daemon, free_port  # bench/ is the script's folder: its sibling module

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.setup_models import model_path  # noqa: E402 - needs the repository on sys.path

MESSAGES = [{"role": "user", "content": "Write a long story about a dragon who lives in a castle by the sea."}]
CONTEXT = 4096


def tokens_per_second(samples: list[tuple[int, float]]) -> float:
    return statistics.median(tokens / seconds for tokens, seconds in samples)


async def measure(runs: int, call: Callable[[], Awaitable[int]]) -> list[tuple[int, float]]:
    await call()  # warm-up: loads the model, fills the cache
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        tokens = await call()
        samples.append((tokens, time.perf_counter() - start))
    return samples


async def in_process(args: argparse.Namespace) -> list[tuple[int, float]]:
    import llama_cpp

    llama = llama_cpp.Llama(
        str(model_path("smollm2")), n_ctx=CONTEXT, n_threads=args.threads, n_threads_batch=args.threads, verbose=False
    )

    async def call() -> int:
        answer: Any = await asyncio.to_thread(
            llama.create_chat_completion, MESSAGES, temperature=0, max_tokens=args.max_tokens
        )
        return int(answer["usage"]["completion_tokens"])

    try:
        return await measure(args.runs, call)
    finally:
        llama.close()


async def over_http(url: str, model: str, args: argparse.Namespace) -> list[tuple[int, float]]:
    body = {"model": model, "messages": MESSAGES, "temperature": 0, "max_tokens": args.max_tokens}
    async with aiohttp.ClientSession() as session:

        async def call() -> int:
            async with session.post(f"{url}/v1/chat/completions", json=body) as response:
                answer = await response.json()
                assert response.status == 200, answer
                return int(answer["usage"]["completion_tokens"])

        return await measure(args.runs, call)


@contextlib.asynccontextmanager
async def llama_cpp_server(args: argparse.Namespace) -> AsyncIterator[str]:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llama_cpp.server", "--model", str(model_path("smollm2")), "--port", str(port),
        "--n_ctx", str(CONTEXT), "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(600):
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{url}/v1/models") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.05)
        yield url
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)


async def main(args: argparse.Namespace) -> None:
    results: dict[str, list[tuple[int, float]]] = {}
    results["(a) llama-cpp-python in-process"] = await in_process(args)
    if importlib.util.find_spec("llama_cpp.server") and importlib.util.find_spec("uvicorn"):
        async with llama_cpp_server(args) as url:
            results["(b) llama_cpp.server over HTTP"] = await over_http(url, "smollm2", args)
    else:
        print("(b) llama_cpp.server: skipped, run pip install 'llama-cpp-python[server]'")
    device = {"threads": args.threads, "batch_threads": args.threads}
    models = {"chat": {"task": "text-completion", "engine": "llama-cpp", "location": str(model_path("smollm2")),
                       "context_size": CONTEXT, "device": device}}  # fmt: skip
    async with Daemon(models) as url:
        results["(c) lllmsd over HTTP"] = await over_http(url, "chat", args)

    base = tokens_per_second(results["(a) llama-cpp-python in-process"])
    print(f"{'backend':34} {'tok/s':>8} {'ratio':>6}   ({args.runs} runs, {args.max_tokens} tok, {args.threads} thr)")
    for name, samples in results.items():
        rate = tokens_per_second(samples)
        print(f"{name:34} {rate:8.1f} {rate / base:6.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    asyncio.run(main(parser.parse_args()))
