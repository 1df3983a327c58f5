"""Embedding throughput: what dynamic batching buys, on all-MiniLM-L6-v2, torch and ONNX backends.

For each backend it measures sentences per second for
  (a) the raw engine in-process, encoding batches of 32: the limit;
  (b) lllmsd over HTTP with 64 concurrent clients, each sending one sentence per request (base64, as the
      official SDK asks by default), batching on (the model's defaults);
  (c) the same with batching disabled (max_batch_size: 1);
and prints (b)/(a) (how close the daemon comes to the engine's best; target >= 0.95) and (b)/(c) (what
batching buys; raw batch 32 vs batch 1 is ~2.2x on torch and ~1.6x on ONNX on two cores). For (b) it
also prints the cores used by the clients, the daemon's event loop and the engine's worker process: what
(a) has to itself and (b) shares. And, since that share is not free on a machine with few cores:
  (a') the raw engine again, beside a neighbour that takes as many cores as (b)'s clients and daemon took
       (two processes spinning in half-millisecond bursts, as request handling comes), and (b)/(a'):
       how (b) compares with the engine itself when both share the machine alike.

The daemon runs in a child process (create_app on 127.0.0.1, a free port) so the clients' own CPU work is
not on the daemon's event loop; on a two-core machine they still share the cores, as real clients would.

    .venv/bin/python bench/embeddings.py [--seconds 4] [--rounds 3] [--backends torch,onnx]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
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

CLIENTS = 64
RAW_BATCH = 32
SUBJECTS = ("cat", "stock market", "weather", "new phone", "football match", "recipe", "train", "garden")
VERBS = ("changed a lot today", "is what everyone talks about", "surprised me this morning", "was in the news")
SENTENCES = [f"The {s} {v}, and {n} people noticed." for s in SUBJECTS for v in VERBS for n in range(4)]


def model(backend: str, **options: Any) -> dict[str, Any]:
    if backend == "onnx":
        source = {"location": str(model_path("minilm-onnx")), "backend": "onnx", "file_name": "onnx/model_qint8.onnx"}
    else:
        source = {"location": str(model_path("minilm"))}
    return {"task": "embedding", "engine": "sentence-transformers", "min_instances": 1, **source, **options}


# ----------------------------------------------------------------------------------------- (a) raw


class RawEngine:
    """The engine in this process, encoding batches of RAW_BATCH."""

    def __init__(self, backend: str) -> None:
        from lllmsd.config import parse_config
        from lllmsd.engines.base import ModelFiles
        from lllmsd.engines.sentence_transformers import SentenceTransformersEngine

        config = parse_config({"models": {"m": model(backend)}}).models["m"]
        self.engine = SentenceTransformersEngine(config, ModelFiles(Path(config.location)))
        self.batches = [tuple(SENTENCES[i : i + RAW_BATCH]) for i in range(0, len(SENTENCES), RAW_BATCH)]
        self.rate(1.0)  # warm-up, as long as the daemon clients get

    def rate(self, seconds: float) -> float:
        from lllmsd.core.jobs import EmbeddingJob

        done, started = 0, time.perf_counter()
        while True:
            batch = self.batches[(done // RAW_BATCH) % len(self.batches)]
            self.engine.embed(EmbeddingJob(inputs=batch))
            done += len(batch)
            if time.perf_counter() - started >= seconds:
                return done / (time.perf_counter() - started)

    def close(self) -> None:
        self.engine.close()


# ----------------------------------------------------------------------------------- (b), (c) daemon


async def _client_rate(port: int, seconds: float, cpu: CpuSplit) -> float:
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/embeddings"
    done = 0
    measuring = False
    stop_at = 0.0

    async def client(offset: int, session: aiohttp.ClientSession) -> None:
        nonlocal done
        i = offset
        while not measuring or time.perf_counter() < stop_at:
            body = {"model": "emb", "input": SENTENCES[i % len(SENTENCES)], "encoding_format": "base64"}
            async with session.post(url, json=body) as response:
                if response.status != 200:
                    raise RuntimeError(f"{response.status}: {await response.text()}")
                await response.read()
            if measuring:
                done += 1
            i += CLIENTS

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CLIENTS)) as session:
        # wait until the instance is loaded and answers
        for _ in range(600):
            async with session.post(url, json={"model": "emb", "input": "warm up"}) as response:
                if response.status == 200:
                    break
            await asyncio.sleep(0.1)
        clients = [asyncio.create_task(client(n, session)) for n in range(CLIENTS)]
        await asyncio.sleep(1.0)  # warm-up under load
        done, measuring = 0, True
        cpu.start()
        started = time.perf_counter()
        stop_at = started + seconds
        await asyncio.gather(*clients)
        elapsed = time.perf_counter() - started
        cpu.stop(elapsed)
        return done / elapsed


class Neighbour:
    """Two processes that together take ``cores`` of CPU in bursts of BURST seconds, the grain at which a
    daemon handles requests, and sleep between them: a stand-in for (b)'s clients and daemon beside (a)."""

    BURST = 0.0005

    def __init__(self, cores: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._processes = [context.Process(target=_spin, args=(self._stop, cores / 2), daemon=True) for _ in range(2)]

    def __enter__(self) -> Neighbour:
        for process in self._processes:
            process.start()
        time.sleep(0.5)  # started and spinning before the measurement
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for process in self._processes:
            process.join()


def _spin(stop: Any, share: float) -> None:
    period = Neighbour.BURST / max(share, 0.001)
    while not stop.is_set():
        started = time.perf_counter()
        while time.perf_counter() - started < Neighbour.BURST:
            pass
        time.sleep(max(period - (time.perf_counter() - started), 0.0))


class CpuSplit:
    """Cores used by the clients (this process), the daemon and its worker processes over a measurement:
    where the CPU that the raw engine has to itself goes when it serves over HTTP."""

    def __init__(self, daemon_pid: int) -> None:
        self.daemon_pid = daemon_pid
        self._before: dict[str, float] = {}
        self.cores: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        workers = [int(p) for p in Path(f"/proc/{self.daemon_pid}/task/{self.daemon_pid}/children").read_text().split()]
        return {
            "clients": _cpu_seconds(os.getpid()),
            "daemon": _cpu_seconds(self.daemon_pid),
            "workers": sum(_cpu_seconds(pid) for pid in workers),
        }

    def start(self) -> None:
        self._before = self._now()

    def stop(self, elapsed: float) -> None:
        after = self._now()
        self.cores = {name: (after[name] - self._before[name]) / elapsed for name in after}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class Daemon(ChildDaemon):
    """lllmsd serving one embedding model ("emb") in a child process."""

    def __init__(self, backend: str, **options: Any) -> None:
        super().__init__({"emb": model(backend, **options)})
        assert self.pid is not None
        self.cpu = CpuSplit(self.pid)

    def rate(self, seconds: float) -> float:
        return asyncio.run(_client_rate(self.port, seconds, self.cpu))


# --------------------------------------------------------------------------------------------- main


def measure(backend: str, seconds: float, rounds: int) -> None:
    """(a), (b), (c) in interleaved rounds, so a neighbour's load on a shared machine hits all three alike;
    the figures are the medians of the rounds."""
    raw = RawEngine(backend)
    batching = Daemon(backend)
    single = Daemon(backend, max_batch_size=1, batch_window_ms=0)
    figures: dict[str, list[float]] = {"a": [], "b": [], "c": [], "a'": []}
    splits: list[dict[str, float]] = []
    try:
        # both daemons load their instance as they start: wait for them (a short measurement each), so
        # that the first round of (a) does not share the cores with two model loads
        batching.rate(0.5)
        single.rate(0.5)
        for round_ in range(1, rounds + 1):
            figures["a"].append(raw.rate(seconds))
            figures["b"].append(batching.rate(seconds))
            splits.append(batching.cpu.cores)
            figures["c"].append(single.rate(seconds))
            with Neighbour(batching.cpu.cores["clients"] + batching.cpu.cores["daemon"]):
                figures["a'"].append(raw.rate(seconds))
            print(f"[{backend}] round {round_}: " + "  ".join(f"({k}) {v[-1]:6.1f}" for k, v in figures.items()))
    finally:
        raw.close()
        batching.close()
        single.close()
    a, b, c, shared = (statistics.median(figures[k]) for k in ("a", "b", "c", "a'"))
    print(f"[{backend}] (a) raw engine, batch {RAW_BATCH}:            {a:8.1f} sentences/s")
    print(f"[{backend}] (b) lllmsd, {CLIENTS} clients, batching:    {b:8.1f} sentences/s")
    print(f"[{backend}] (c) lllmsd, {CLIENTS} clients, no batching: {c:8.1f} sentences/s")
    print(f"[{backend}] (b)/(a) = {b / a:.2f}   (b)/(c) = {b / c:.2f}   target (b)/(a) >= 0.95", flush=True)
    split = {name: statistics.median(s[name] for s in splits) for name in splits[0]}
    idle = os.cpu_count() or 1
    print(f"[{backend}] (b) cores used, medians: " + "  ".join(f"{k} {v:.2f}" for k, v in split.items())
          + f"  idle {idle - sum(split.values()):.2f} of {idle}", flush=True)  # fmt: skip
    beside = split["clients"] + split["daemon"]
    print(f"[{backend}] (a') raw engine beside a {beside:.2f}-core neighbour: {shared:8.1f} sentences/s  "
          f"(a')/(a) = {shared / a:.2f}   (b)/(a') = {b / shared:.2f}", flush=True)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring time per figure and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--backends", default="torch,onnx")
    args = parser.parse_args()
    print(
        f"all-MiniLM-L6-v2, {len(SENTENCES)} different sentences, {CLIENTS} clients, "
        f"{args.rounds} rounds of {args.seconds:g}s per figure, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    for backend in args.backends.split(","):
        measure(backend, args.seconds, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
