"""How much memory one instance of a model will take, before it loads: what the budget reserves.

In order of preference:
- ``declared``: the model's ``memory_estimate`` option (the user knows better; the fake engine's sizes);
- ``estimated``: the engine's own estimate from the files (GGUF: weights + KV cache + activations from
  the file's metadata, engines/llama_cpp/memory.py);
- ``measured``: the resident memory of this model's first loaded instance, reused for the next ones;
- ``files``: until then, the size of the weights on disk (the least a load can take).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from lllmsd.engines.base import Engine, ModelFiles


async def estimate_instance(
    config: Any, engine_class: type[Engine], files: ModelFiles, measured: int | None
) -> tuple[int, str]:
    """(bytes, source) for one more instance of the model; reads files, so off the event loop."""
    if config.memory_estimate is not None:
        return int(config.memory_estimate), "declared"
    estimated = await asyncio.to_thread(engine_class.estimate_memory, config, files)
    if estimated is not None:
        return int(estimated), "estimated"
    if measured is not None:
        return measured, "measured"
    return await asyncio.to_thread(files_size, files), "files"


def files_size(files: ModelFiles) -> int:
    """Bytes of a model's weights on disk: the file, or every file under the folder (links followed)."""
    if files.path is None:
        return 0
    path = Path(files.path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def known_estimate(config: Any, engine_class: type[Engine]) -> int | None:
    """One instance's estimate when it can be known before anything is downloaded or loaded: declared,
    or the engine's own from a local ``location`` (``lllmsd config check``; blocking)."""
    if config.memory_estimate is not None:
        return int(config.memory_estimate)
    if config.location is None or not Path(config.location).exists():
        return None
    try:
        return engine_class.estimate_memory(config, ModelFiles(Path(config.location)))
    except Exception:  # an unreadable file is the load's error to report, with its context
        return None


def min_instances_problems(models: dict[str, Any], classes: dict[str, type[Engine]], budget: int) -> list[str]:
    """The models' ``min_instances`` cannot all be held at once within ``budget`` (where estimates are known)."""
    needed = {
        model_id: config.min_instances * size
        for model_id, config in models.items()
        if config.min_instances and (size := known_estimate(config, classes[model_id])) is not None
    }
    if sum(needed.values()) <= budget:
        return []
    parts = ", ".join(f"{m} {n / 2**20:.0f} MiB" for m, n in needed.items())
    return [
        f"min_instances need {sum(needed.values()) / 2**20:.0f} MiB ({parts}), more than memory_budget "
        f"({budget / 2**20:.0f} MiB): they could never all load"
    ]
