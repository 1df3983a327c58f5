"""How many threads one llama-cpp instance uses, when the config's ``device`` leaves them out.

``device.threads`` (generation) and ``device.batch_threads`` (prompt evaluation) win when given. Left
out, each instance gets its share of the cores, ``cores // max_instances`` (at least 1), for prompt
evaluation, and at most half the cores for generation (llama-cpp-python's own choice, the fastest measured
on 2 cores: shared/MODELS.md), unless the instance has slots (then its whole share: batched steps are
compute-bound). So one instance on 2 cores uses 1 and 2 threads; two instances sharing
them use 1 and 1: ggml threads spin-wait, and two instances each asking for both cores slow each other
down (bench/chat_throughput.py).
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_batch_threads(max_instances: int, cores: int | None = None) -> int:
    """Prompt-evaluation threads of one instance: its share of the cores when instances run at once."""
    return max(1, (cores or usable_cores()) // max(1, max_instances))


def default_threads(max_instances: int, cores: int | None = None, *, slots: int = 1) -> int:
    """Generation threads of one instance: its share, and at most half the cores (token-by-token
    decoding is memory-bound; more threads mostly spin). An instance with slots evaluates a token of each
    request per step, which is compute-bound like a prompt: it gets its whole share (SmolLM2, four
    sequences per step on 2 cores: 76 tok/s on one thread, 144 on two)."""
    share = default_batch_threads(max_instances, cores)
    if slots > 1:
        return share
    return max(1, min((cores or usable_cores()) // 2, share))
