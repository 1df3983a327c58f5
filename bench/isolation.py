"""One stream on SmolLM2 with the engine on a daemon thread vs in a worker process, interleaved in one run.

bench/chat_throughput.py compares lllmsd with other servers; its absolute figures wander by +-15% between
runs on a shared 2-core machine, too much to see a few percent. This isolates the one thing the worker
process changes: two instances of the same model in one process, one ``isolation: thread`` and one
``isolation: process``, take turns on the same 128-token greedy answer, so drifting load hits both alike.
Prints each one's tokens/s (median of ``--rounds``) and the ratio process/thread (target >= 0.95).

Run: .venv/bin/python bench/isolation.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lllmsd.core.instance import ModelInstance
from lllmsd.core.jobs import ChatJob, ChatMessage, Sampling, Usage
from tests.engines.conftest import TEXT_MODELS, load_instance

JOB = ChatJob(
    (ChatMessage("user", "Write a long story about a dragon who lives in a castle."),),
    Sampling(max_tokens=128, temperature=0),
)


async def rate(instance: ModelInstance) -> float:
    start = time.perf_counter()
    tokens = 0
    async for event in instance.generate(JOB):
        if isinstance(event, Usage):
            tokens = event.completion_tokens
    return tokens / (time.perf_counter() - start)


async def main(rounds: int) -> int:
    model = TEXT_MODELS["llama-cpp"]()  # one thread for generation and prompt
    instances = {name: await load_instance(model, isolation=name) for name in ("thread", "process")}
    rates: dict[str, list[float]] = {name: [] for name in instances}
    try:
        for instance in instances.values():
            await rate(instance)  # warm up: the prompt is cached from here on
        for _ in range(rounds):
            for name, instance in instances.items():
                rates[name].append(await rate(instance))
    finally:
        for instance in instances.values():
            await instance.dispose()
    print(f"SmolLM2, 128 tokens, temperature 0, 1 thread; load average {os.getloadavg()[0]:.2f}")
    for name, values in rates.items():
        print(f"{name:8} median {statistics.median(values):6.1f} tok/s   runs {', '.join(f'{v:.1f}' for v in values)}")
    ratio = statistics.median(rates["process"]) / statistics.median(rates["thread"])
    print(f"process / thread {ratio:.3f}   target >= 0.95: {'met' if ratio >= 0.95 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    sys.exit(asyncio.run(main(parser.parse_args().rounds)))
