"""Scale-out on SmolLM2: two daemons behind nginx, with session hashing and with round robin, against one
daemon reached directly.

``--conversations`` (8) concurrent conversations of ``--turns`` (4) turns each, every turn streamed with
usage, the next turn sent once the answer is in and the user has "read" it: a think time of 0-2 s drawn
from a generator seeded per conversation (without it, conversations in lockstep finish in the same
alternating order that round robin hands out daemons, and round robin looks sticky by accident).
Each daemon stands for one machine: ``concurrency`` 1 and one llama.cpp thread, ``--instances`` (8)
instances loaded before the run, so no figure includes a load. nginx runs the shipped
deploy/nginx/lllmsd.conf (tests/cluster.py); the round-robin run drops its ``hash`` line. Per scenario:
- aggregate completion tokens per second of wall time;
- p50 time to first token over every turn;
- the share of prompt tokens served from an instance's cache (usage.prompt_tokens_details.cached_tokens
  over usage.prompt_tokens).
Target: hashing keeps the cache share within 10% of the single daemon's; round robin shows what it
loses. Every conversation of a scenario shares one system prompt of its own (a typical app: the shared
prefix is cached wherever a turn lands, the conversation is not), so no scenario finds another's
conversations in the caches.

Run: .venv/bin/python bench/scale_out.py [--conversations 8] [--turns 4] [--max-tokens 32]
ggml threads spin-wait: other load on the machine moves the figures a lot (the load average is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.cluster import DaemonProcess, Nginx, nginx_binary  # noqa: E402 - needs the repository on sys.path
from tests.setup_models import model_path  # noqa: E402

MODEL = "smollm2"
SYSTEM = (
    "You are a patient assistant for {scenario}. You answer in plain words, in two or three short sentences, "
    "and you remember what the user said earlier in the conversation. You never use lists or headings."
)
OPENERS = ["I grow tomatoes on a balcony.", "I am learning to play the cello.", "I keep bees in my garden.",
           "I repair old bicycles.", "I bake sourdough bread.", "I collect postage stamps.",
           "I sail a small boat on a lake.", "I knit scarves for friends."]  # fmt: skip
THINK_SECONDS = 2.0
FOLLOW_UPS = ["What should I watch out for?", "How do I get better at it?", "What would a beginner get wrong?",
              "Summarise your advice in one sentence."]  # fmt: skip


@dataclass(frozen=True)
class Turn:
    ttft: float
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def daemon_config(instances: int) -> dict[str, Any]:
    return {
        "concurrency": 1,
        "models": {
            MODEL: {
                "task": "text-completion",
                "engine": "llama-cpp",
                "location": str(model_path("smollm2")),
                "context_size": 2048,
                "min_instances": instances,
                "max_instances": instances,
                "device": {"threads": 1, "batch_threads": 1},
            }
        },
    }


def wait_loaded(daemon: DaemonProcess, instances: int) -> None:
    """Until every instance of the model is loaded (GET / says idle), so no turn waits for a load."""
    deadline = time.monotonic() + 600
    while True:
        with urllib.request.urlopen(daemon.url + "/", timeout=60) as response:
            states = [i["state"] for i in json.loads(response.read())["models"][MODEL]["instances"]]
        if states.count("idle") == instances:
            return
        if time.monotonic() > deadline or daemon.process.poll() is not None:
            raise RuntimeError(f"{daemon.name}: instances did not load ({states})")
        time.sleep(0.2)


async def turn(
    session: aiohttp.ClientSession, url: str, messages: list[dict[str, str]], sid: str, max_tokens: int
) -> tuple[Turn, str]:
    payload = {
        "model": MODEL, "messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    start = time.perf_counter()
    ttft: float | None = None
    text: list[str] = []
    usage: dict[str, Any] | None = None
    async with session.post(f"{url}/v1/chat/completions", json=payload, headers={"X-Session-Id": sid}) as response:
        assert response.status == 200, await response.text()
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            assert "error" not in chunk, chunk
            for choice in chunk.get("choices") or ():
                piece = choice["delta"].get("content")
                if piece:
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    text.append(piece)
            usage = chunk.get("usage") or usage
    assert usage is not None
    assert ttft is not None
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return Turn(ttft, usage["completion_tokens"], usage["prompt_tokens"], cached), "".join(text)


async def conversation(url: str, scenario: str, index: int, turns: int, max_tokens: int) -> list[Turn]:
    messages = [{"role": "system", "content": SYSTEM.format(scenario=scenario)}]
    sid = f"{scenario}-{index}"
    think = random.Random(index)  # the same think times in every scenario
    measured = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
        for n in range(turns):
            await asyncio.sleep(think.uniform(0, THINK_SECONDS))
            question = OPENERS[index % len(OPENERS)] if n == 0 else FOLLOW_UPS[(n - 1) % len(FOLLOW_UPS)]
            messages.append({"role": "user", "content": question})
            result, answer = await turn(session, url, messages, sid, max_tokens)
            messages.append({"role": "assistant", "content": answer})
            measured.append(result)
    return measured


async def run(url: str, scenario: str, conversations: int, turns: int, max_tokens: int) -> dict[str, float]:
    start = time.perf_counter()
    results = await asyncio.gather(*(conversation(url, scenario, i, turns, max_tokens) for i in range(conversations)))
    wall = time.perf_counter() - start
    every = [t for conv in results for t in conv]
    return {
        "tokens_per_s": sum(t.completion_tokens for t in every) / wall,
        "p50_ttft": statistics.median(t.ttft for t in every),
        "cache_share": sum(t.cached_tokens for t in every) / sum(t.prompt_tokens for t in every),
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--instances", type=int, default=8, help="instances per daemon, loaded before the runs")
    args = parser.parse_args()
    if nginx_binary() is None:
        sys.exit("nginx is not installed: make system-deps")
    print(f"SmolLM2, {args.conversations} conversations x {args.turns} turns, max_tokens {args.max_tokens}; "
          f"two daemons, concurrency 1 and one thread each; load average {loadavg()}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="lllmsd-scale-out-") as folder:
        base = Path(folder)
        daemons = [DaemonProcess.start(base / n, n, daemon_config(args.instances)) for n in ("one", "two")]
        proxies: list[Nginx] = []
        try:
            for daemon in daemons:
                wait_loaded(daemon, args.instances)
            upstreams = [d.address for d in daemons]
            hashing = Nginx.start(base / "nginx-hash", upstreams)
            proxies.append(hashing)
            round_robin = Nginx.start(base / "nginx-rr", upstreams, balance="round-robin")
            proxies.append(round_robin)
            scenarios = [
                ("one daemon, direct", daemons[0].url),
                ("two daemons, nginx session hashing", hashing.url),
                ("two daemons, nginx round robin", round_robin.url),
            ]
            figures = {}
            for name, url in scenarios:
                scenario = name.split(",")[-1].strip().replace(" ", "-")
                figures[name] = asyncio.run(run(url, scenario, args.conversations, args.turns, args.max_tokens))
                f = figures[name]
                print(
                    f"  {name:<36} {f['tokens_per_s']:6.1f} tok/s   p50 TTFT {f['p50_ttft']:6.3f} s   "
                    f"cache share {f['cache_share']:5.1%}   ({f['wall']:.1f} s; load average {loadavg()})"
                )
        finally:
            for proxy in proxies:
                proxy.stop()
            for daemon in daemons:
                daemon.terminate()
    single = figures["one daemon, direct"]["cache_share"]
    hashed = figures["two daemons, nginx session hashing"]["cache_share"]
    gap = abs(hashed - single) / single if single else float("nan")
    verdict = "met" if gap <= 0.10 else "MISSED"
    print(f"  hashing's cache share is {gap:.1%} from the single daemon's (target <= 10%: {verdict})")


if __name__ == "__main__":
    main()
