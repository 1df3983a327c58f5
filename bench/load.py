"""A bounded loopback load run: does the daemon lose or fail anything under load, and does it leak?

`lllmsd serve` runs in a subprocess; a client sends a mix of chat (plain and streamed), completion and
embedding requests at a fixed concurrency and checks every answer's content. It prints requests/s,
p50/p99 latency, the outcome counts (deliberate 429s from a full queue are counted apart from failures)
and the daemon's resident memory (RSS) after a warm-up and after the run, which must stay within 10%.

  1. FakeEngine: 5,000 requests at 100 concurrency (max_waiting below the concurrency, so some 429s).
  2. Real models (skipped with --fake-only): SmolLM2 on llama-cpp and all-MiniLM-L6-v2 on
     sentence-transformers, 300 requests at 8 concurrency.

Run: .venv/bin/python bench/load.py [--requests 5000] [--concurrency 100] [--fake-only]
Exit status 1 if any request was lost or failed, or RSS grew by more than 10%.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from pool_overhead import Daemon, percentiles  # bench/ is the script's folder: its sibling module

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MAX_RSS_GROWTH = 0.10
MAX_TRIES = 50
RETRY_DELAY = 0.05  # seconds; shorter than Retry-After (1 s) to keep the run short
MIX = ("chat", "chat", "chat", "stream", "completion", "completion", "embedding", "embedding", "embedding", "chat")


@dataclass
class Outcome:
    latencies: list[float] = field(default_factory=list)
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    retried: int = 0  # 429 answers (queue full), each retried


def rss_kib(pid: int) -> int:
    """Resident set size of a process (Linux), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def request_for(kind: str, n: int, text_model: str, embedding_model: str, max_tokens: int | None) -> tuple[str, dict]:
    words = f"request number {n} of the load run"
    extra: dict[str, Any] = {"max_tokens": max_tokens} if max_tokens else {}
    if kind in ("chat", "stream"):
        body = {"model": text_model, "messages": [{"role": "user", "content": words}], **extra}
        if kind == "stream":
            body["stream"] = True
        return "/v1/chat/completions", body
    if kind == "completion":
        return "/v1/completions", {"model": text_model, "prompt": words, "max_tokens": max_tokens or 16}
    return "/v1/embeddings", {"model": embedding_model, "input": [words, f"second input {n}"]}


def check(kind: str, n: int, status: int, payload: Any, exact: bool) -> str:
    """The outcome of one request: ok, rate_limited (429), http_<status>, or wrong (a 200 with a bad body)."""
    if status == 429:
        return "rate_limited"
    if status != 200:
        return f"http_{status}"
    words = f"request number {n} of the load run"
    if kind == "stream":
        events = [line.removeprefix("data: ") for line in payload.split("\n") if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]" or any('"error"' in e for e in events):
            return "wrong"
        text = "".join((json.loads(e)["choices"] or [{}])[0].get("delta", {}).get("content") or "" for e in events[:-1])
        return "ok" if (text == words or not exact) and text else "wrong"
    if kind == "chat":
        text = payload["choices"][0]["message"]["content"]
        return "ok" if (text == words or not exact) and text else "wrong"
    if kind == "completion":
        return "ok" if payload["choices"][0]["text"] or not exact else "wrong"
    vectors = [item["embedding"] for item in payload["data"]]
    return "ok" if len(vectors) == 2 and all(len(v) > 0 for v in vectors) else "wrong"


async def run_load(
    url: str,
    total: int,
    concurrency: int,
    text_model: str,
    embedding_model: str,
    *,
    exact: bool,
    max_tokens: int | None = None,
) -> tuple[Outcome, float]:
    outcome = Outcome()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(total):
        queue.put_nowait(n)
    timeout = aiohttp.ClientTimeout(total=300)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(n: int) -> None:
            kind = MIX[n % len(MIX)]
            path, body = request_for(kind, n, text_model, embedding_model, max_tokens)
            for _ in range(MAX_TRIES):
                started = time.perf_counter()
                try:
                    async with session.post(f"{url}{path}", json=body) as response:
                        payload = await (response.text() if kind == "stream" else response.json(content_type=None))
                        result = check(kind, n, response.status, payload, exact)
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                    result = f"client_error_{type(exc).__name__}"
                if result != "rate_limited":
                    break
                outcome.retried += 1  # a full queue said 429: retry later, as the OpenAI SDK does
                await asyncio.sleep(RETRY_DELAY)
            outcome.latencies.append(time.perf_counter() - started)
            outcome.counts[result] += 1

        async def worker() -> None:
            while not queue.empty():
                await one(queue.get_nowait())

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return outcome, time.perf_counter() - started


async def daemon_is_quiet(url: str) -> bool:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/") as response:
        status = await response.json()
    return status["concurrency"]["in_use"] == 0 and all(
        model["waiting"] == 0 and all(i["state"] != "busy" for i in model["instances"])
        for model in status["models"].values()
    )


def report(name: str, total: int, outcome: Outcome, elapsed: float, rss: tuple[int, int, int], quiet: bool) -> bool:
    p50, p99 = percentiles(outcome.latencies)
    counts = outcome.counts
    failed = total - counts["ok"] - counts["rate_limited"]  # a request still turned away after every retry
    lost = total - sum(counts.values())
    start, before, after = rss
    growth = (after - before) / before
    print(f"\n== {name}: {total} requests")
    print(f"throughput   {total / elapsed:8.0f} requests/s   ({elapsed:.1f} s)")
    print(f"latency      p50 {p50 * 1000:8.1f} ms   p99 {p99 * 1000:8.1f} ms   (the answered attempt)")
    print(
        f"outcomes     ok {counts['ok']}   failed {failed}   lost {lost}   "
        f"(deliberate 429s from full queues: {outcome.retried}, each retried; given up {counts['rate_limited']})"
    )
    others = {k: v for k, v in counts.items() if k not in ("ok", "rate_limited")}
    if others:
        print(f"             failures by kind: {dict(others)}")
    print(
        f"daemon RSS   at start {start / 1024:.1f} MiB   after warm-up {before / 1024:.1f} MiB   "
        f"after the run {after / 1024:.1f} MiB   ({growth:+.1%}, limit {MAX_RSS_GROWTH:+.0%})"
    )
    print(f"GET / after  {'no busy instance, nobody waiting' if quiet else 'SOMETHING IS STILL BUSY OR WAITING'}")
    return failed == 0 and lost == 0 and growth <= MAX_RSS_GROWTH and quiet


async def scenario(
    name: str,
    models: dict[str, Any],
    text_model: str,
    embedding_model: str,
    total: int,
    concurrency: int,
    *,
    daemon_concurrency: int,
    exact: bool,
    max_tokens: int | None = None,
) -> bool:
    daemon = Daemon(models, concurrency=daemon_concurrency)
    async with daemon as url:
        assert daemon.process is not None
        pid = daemon.process.pid
        start = rss_kib(pid)
        # warm-up: instances loaded, imports and caches filled, so what follows measures growth, not start-up
        await run_load(
            url, max(total // 10, 20), concurrency, text_model, embedding_model, exact=exact, max_tokens=max_tokens
        )
        before = rss_kib(pid)
        outcome, elapsed = await run_load(
            url, total, concurrency, text_model, embedding_model, exact=exact, max_tokens=max_tokens
        )
        await asyncio.sleep(1)  # let the last releases and disposals finish before measuring
        after = rss_kib(pid)
        quiet = await daemon_is_quiet(url)
    return report(name, total, outcome, elapsed, (start, before, after), quiet)


def fake_models(concurrency: int) -> dict[str, Any]:
    # a queue shorter than the client's concurrency: some requests are turned away with 429, on purpose
    waiting = max(concurrency // 2, 1)
    return {
        "chat": {"task": "text-completion", "engine": "fake", "max_instances": 4, "max_waiting": waiting},
        "emb": {"task": "embedding", "engine": "fake", "max_waiting": waiting},
    }


def real_models() -> dict[str, Any]:
    from tests.setup_models import model_path

    return {
        "smol": {
            "task": "text-completion",
            "engine": "llama-cpp",
            "location": str(model_path("smollm2")),
            "max_instances": 2,
            "max_waiting": 256,
            "context_size": 1024,
            "device": {"threads": 1, "batch_threads": 1},
        },
        "minilm": {
            "task": "embedding",
            "engine": "sentence-transformers",
            "location": str(model_path("minilm")),
            "max_waiting": 256,
        },
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--real-requests", type=int, default=300)
    parser.add_argument("--real-concurrency", type=int, default=8)
    parser.add_argument("--fake-only", action="store_true")
    args = parser.parse_args()
    good = await scenario(
        "FakeEngine (chat, streamed chat, completions, embeddings)",
        fake_models(args.concurrency),
        "chat",
        "emb",
        args.requests,
        args.concurrency,
        daemon_concurrency=4,
        exact=True,
    )
    if not args.fake_only:
        good &= await scenario(
            "real models: SmolLM2 on llama-cpp (8 tokens), all-MiniLM-L6-v2 on sentence-transformers",
            real_models(),
            "smol",
            "minilm",
            args.real_requests,
            args.real_concurrency,
            daemon_concurrency=2,
            exact=False,
            max_tokens=8,
        )
    print("\nPASS" if good else "\nFAIL")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
