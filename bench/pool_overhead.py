"""What the pool and the HTTP layer add per request, and whether a burst loses anything.

On the FakeEngine with zero delay (so the engine costs almost nothing), it measures per request:
  (a) the engine alone, called in-process;
  (b) the pool: acquire an instance, run it in its worker thread, release;
  (b') the same with the engine in a worker process (``isolation: process``, every real engine's
       default): what the framed protocol over the worker's socket adds;
  (c) the whole daemon over HTTP on loopback (`lllmsd serve` in a subprocess, one client at a time);
and prints p50/p99 of each and the added latency (b)-(a) and (c)-(a). Then it sends 2,000 requests at
200 concurrency to a model with max_instances 4 and reports completed and failed counts.

Run: .venv/bin/python bench/pool_overhead.py [--requests N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import yaml

from lllmsd.config import parse_config
from lllmsd.core.clock import SystemClock
from lllmsd.core.jobs import ChatJob, ChatMessage, Sampling, collect_generation
from lllmsd.core.limit import ConcurrencyLimit
from lllmsd.core.pool import ModelPool
from lllmsd.engines.base import ModelFiles
from lllmsd.engines.fake import FakeEngine

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = (ChatMessage("user", "one two three four five six seven eight"),)
BODY = {"model": "chat", "messages": [{"role": "user", "content": "one two three four five six seven eight"}]}


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def bench_engine(n: int) -> list[float]:
    config = parse_config({"models": {"chat": {"task": "text-completion", "engine": "fake"}}}).models["chat"]
    engine = FakeEngine(config, ModelFiles(None))
    cancel = threading.Event()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        collect_generation(engine.chat(ChatJob(MESSAGES, Sampling()), cancel))
        samples.append(time.perf_counter() - start)
    return samples


async def bench_pool(n: int, isolation: str = "thread") -> list[float]:
    model = {"task": "text-completion", "engine": "fake", "isolation": isolation}
    config = parse_config({"models": {"chat": model}}).models["chat"]

    async def files() -> ModelFiles:
        return ModelFiles(None)

    pool = ModelPool("chat", config, FakeEngine, files=files, limiter=ConcurrencyLimit(2), clock=SystemClock())
    samples = []
    try:
        if isolation == "process":  # start the worker first: the samples measure requests, not a spawn
            async with pool.acquire() as instance:
                [event async for event in instance.generate(ChatJob(MESSAGES, Sampling()))]
        for _ in range(n):
            job = ChatJob(MESSAGES, Sampling())
            start = time.perf_counter()
            async with pool.acquire(job.context()) as instance:
                [event async for event in instance.generate(job)]
            samples.append(time.perf_counter() - start)
    finally:
        await pool.close(1)
    return samples


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """`lllmsd serve` in a subprocess on a free loopback port."""

    def __init__(self, models: dict, concurrency: int = 2, *, start_seconds: float = 10.0) -> None:
        self.start_seconds = start_seconds  # how long it may take to listen (importing engines on a busy machine)
        self.port = free_port()
        self.dir = tempfile.TemporaryDirectory()
        config = {"listen": {"port": self.port}, "concurrency": concurrency, "models": models}
        self.config_path = Path(self.dir.name) / "bench.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> str:
        lllmsd = Path(sys.executable).parent / "lllmsd"
        self.process = await asyncio.create_subprocess_exec(
            str(lllmsd),
            "serve",
            "-c",
            str(self.config_path),
            "--log-level",
            "warning",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ},
        )
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + self.start_seconds
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                try:
                    async with session.get(f"{url}/health") as response:
                        if response.status == 200:
                            return url
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
        raise RuntimeError(f"the daemon did not start in {self.start_seconds:g} s")

    async def __aexit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            await asyncio.wait_for(self.process.wait(), 30)
        self.dir.cleanup()


async def timed(n: int, call: Callable[[], Awaitable[None]]) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return samples


async def bench_http(n: int) -> list[float]:
    models = {"chat": {"task": "text-completion", "engine": "fake"}}
    async with Daemon(models) as url, aiohttp.ClientSession() as session:

        async def call() -> None:
            async with session.post(f"{url}/v1/chat/completions", json=BODY) as response:
                await response.read()
                assert response.status == 200, response.status

        await timed(50, call)  # warm up
        return await timed(n, call)


async def burst(total: int, concurrency: int) -> tuple[int, int, float]:
    models = {"chat": {"task": "text-completion", "engine": "fake", "max_instances": 4, "max_waiting": concurrency}}
    async with Daemon(models, concurrency=4) as url:
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            statuses: list[int] = []
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(total):
                queue.put_nowait(i)

            async def worker() -> None:
                while not queue.empty():
                    i = queue.get_nowait()
                    body = {"model": "chat", "messages": [{"role": "user", "content": f"request {i}"}]}
                    try:
                        async with session.post(f"{url}/v1/chat/completions", json=body) as response:
                            data = await response.json()
                            ok = response.status == 200 and data["choices"][0]["message"]["content"] == f"request {i}"
                            statuses.append(200 if ok else response.status or 599)
                    except aiohttp.ClientError:
                        statuses.append(599)

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - start
    completed = statuses.count(200)
    return completed, total - completed, elapsed


def row(name: str, samples: list[float], base: tuple[float, float] | None = None) -> str:
    p50, p99 = percentiles(samples)
    text = f"{name:<34} p50 {p50 * 1000:8.3f} ms   p99 {p99 * 1000:8.3f} ms"
    if base is not None:
        text += f"   added p50 {(p50 - base[0]) * 1000:7.3f} ms   p99 {(p99 - base[1]) * 1000:7.3f} ms"
    return text


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="sequential requests per layer")
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=200)
    args = parser.parse_args()

    engine = bench_engine(args.requests)
    pool = await bench_pool(args.requests)
    pool_process = await bench_pool(args.requests, "process")
    http = await bench_http(args.requests)
    base = percentiles(engine)
    print(f"load average {os.getloadavg()[0]:.2f}")
    print(f"per-request latency, FakeEngine with zero delay, {args.requests} sequential requests")
    print(row("(a) engine in-process", engine))
    print(row("(b) pool + worker thread", pool, base))
    print(row("(b') pool + worker process", pool_process, base))
    print(row("(c) lllmsd over HTTP (loopback)", http, base))

    completed, failed, elapsed = await burst(args.burst, args.concurrency)
    print(
        f"\nburst: {args.burst} requests at {args.concurrency} concurrency, max_instances 4: "
        f"completed {completed}, failed {failed}, {args.burst / elapsed:.0f} req/s"
    )
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
