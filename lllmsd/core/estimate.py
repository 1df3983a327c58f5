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
