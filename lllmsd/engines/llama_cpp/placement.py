"""Where a llama-cpp instance runs and what it holds, as llama.cpp itself reports it while loading.

llama.cpp logs each buffer it allocates ("CPU_Mapped model buffer size = 92.10 MiB", "CUDA0 KV buffer
size = ...") and, on a build with a GPU backend, "offloaded 31/31 layers to GPU". ``capture_load_log``
installs a log callback for the duration of one load and collects those lines; ``placement`` turns them
into the report ``GET /`` and the start-up log show. The callback is process-wide in llama.cpp: a worker
process loads one model, so the lines are this instance's (with ``isolation: thread`` two loads at the
same moment could mix their reports; the model still loads correctly).

A build without a GPU backend ignores ``gpu_layers``; the report then carries a note saying so, with the
install command, which the pool logs once as a warning (core/pool.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import re
from collections.abc import Iterator
from typing import Any

import llama_cpp
from llama_cpp import _logger

_BUFFER = re.compile(
    r"(?P<name>[\w.-]+(?: \w+)?) (?P<kind>model|KV|compute|output) buffer size\s*=\s*(?P<mib>[\d.]+) MiB"
)
_OFFLOADED = re.compile(r"offloaded (?P<done>\d+)/(?P<total>\d+) layers to GPU")
_HOST_BUFFERS = ("CPU", "CPU_Mapped", "CPU_REPACK", "CPU_AARCH64")

NO_GPU_BACKEND = (
    "gpu_layers {layers} asked, but this llama-cpp-python build has no GPU backend, so the model runs on the "
    "CPU; install a GPU build with `make install ACCEL=cuda` (or ACCEL=vulkan), see docs/accelerators.md"
)


@contextlib.contextmanager
def capture_load_log() -> Iterator[list[str]]:
    """The lines llama.cpp logs inside the block (its default logger is restored afterwards)."""
    lines: list[str] = []
    pending: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        pending.append(text.decode("utf-8", errors="replace"))
        if pending[-1].endswith("\n"):
            lines.extend("".join(pending).splitlines())
            pending.clear()

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        if pending:
            lines.extend("".join(pending).splitlines())


def forget_context_buffers(lines: list[str]) -> None:
    """Drop the lines of a context's buffers (KV, compute, output) logged so far, keeping the model's: the
    context they describe was freed and replaced (model.py: ``share_context``)."""
    lines[:] = [line for line in lines if not ((m := _BUFFER.search(line)) and m["kind"] != "model")]


def buffers(lines: list[str]) -> dict[str, int]:
    """Bytes per buffer llama.cpp allocated, e.g. {"CPU_Mapped model": 96575488, "CPU KV": 23592960}."""
    found: dict[str, int] = {}
    for line in lines:
        if (match := _BUFFER.search(line)) and "~" not in line:  # "~llama_context" lines repeat at free
            name = f"{match['name'].split()[-1]} {match['kind']}"
            found[name] = found.get(name, 0) + int(float(match["mib"]) * 1024 * 1024)
    return found


def placement(llama: llama_cpp.Llama, gpu_layers: int, lines: list[str]) -> dict[str, Any]:
    """Where the instance runs and what it holds, from the loaded ``Llama`` and its load log."""
    held = buffers(lines)
    on_device = {name: size for name, size in held.items() if name.split()[0] not in _HOST_BUFFERS}
    offload = next((m for line in lines if (m := _OFFLOADED.search(line))), None)
    total = llama_cpp.llama_model_n_layer(llama.model) + 1  # llama.cpp counts the output layer too
    notes = []
    gpu = llama_cpp.llama_supports_gpu_offload()
    if gpu_layers != 0 and not gpu:
        notes.append(NO_GPU_BACKEND.format(layers=gpu_layers))
    offloaded = int(offload["done"]) if offload else 0
    return {
        "backend": "llama.cpp",
        "device": "gpu" if offloaded else "cpu",
        "gpu_backend": gpu,
        "layers_offloaded": offloaded,
        "layers_total": int(offload["total"]) if offload else total,
        "context_size": llama_cpp.llama_n_ctx_seq(llama.ctx),  # each slot's, when slots share the context
        "cache_type_k": _type_name(llama.context_params.type_k),
        "cache_type_v": _type_name(llama.context_params.type_v),
        "flash_attn": llama.context_params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
        "buffers": held,
        "device_memory": sum(on_device.values()),
        "notes": notes,
    }


def _type_name(ggml_type: int) -> str:
    for name in dir(llama_cpp):
        if name.startswith("GGML_TYPE_") and getattr(llama_cpp, name) == ggml_type:
            return name.removeprefix("GGML_TYPE_").lower()
    return str(ggml_type)


def ggml_type(name: str) -> int:
    """The ggml type constant of a cache type name from the config (f16, q8_0, ...)."""
    return int(getattr(llama_cpp, f"GGML_TYPE_{name.upper()}"))


SPLIT_MODES = {
    "none": llama_cpp.LLAMA_SPLIT_MODE_NONE,
    "layer": llama_cpp.LLAMA_SPLIT_MODE_LAYER,
    "row": llama_cpp.LLAMA_SPLIT_MODE_ROW,
}
