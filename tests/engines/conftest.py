"""Real engines on real small models, driven through the engine-neutral core (ModelInstance).

Engines are loaded once per test module through ``load_instance``. Model configs per engine live in
``TEXT_MODELS`` / ``EMBEDDING_MODELS`` / ``TRANSCRIPTION_MODELS``: the shared contract suites are
parametrized over them, so adding an engine to a contract is one entry here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from lllmsd.config import parse_config
from lllmsd.core.clock import SystemClock
from lllmsd.core.hosts import ThreadHost
from lllmsd.core.instance import ModelInstance
from lllmsd.core.store import ModelStore
from lllmsd.engines.registry import builtin_engines
from tests.setup_models import model_path

pytestmark = pytest.mark.engines


def model_config(model: dict[str, Any]) -> Any:
    return parse_config({"models": {"m": model}}).models["m"]


async def load_instance(model: dict[str, Any], *, isolation: str | None = None) -> ModelInstance:
    """Load one instance of a model config (a dict as in the YAML) the way the pool does: in a worker
    process, as the daemon runs real engines, unless ``isolation="thread"`` (tests that drive the engine
    object itself: ``engine_of``)."""
    config = model_config({**model, "isolation": isolation} if isolation else model)
    engine_class = await asyncio.to_thread(builtin_engines()[config.engine].class_for, config.task)
    files = await ModelStore(cache_dir=model_path("smollm2").parent).files("m", config)
    instance = ModelInstance("m", config, engine_class, SystemClock(), instance_id="m-1")
    preload = config.preload.to_preload() if config.preload else None
    await instance.load(files, preload)
    return instance


def engine_of(instance: ModelInstance) -> Any:
    """The engine object of a thread-isolated instance (``load_instance(..., isolation="thread")``)."""
    host = instance.host
    assert isinstance(host, ThreadHost), "the engine object lives in a worker process: load with isolation='thread'"
    return host.engine


# Engine name -> a function giving the model dict (as in YAML) the text contract suite runs on.
TEXT_MODELS: dict[str, Callable[[], dict[str, Any]]] = {
    "fake": lambda: {"task": "text-completion", "engine": "fake"},
    "llama-cpp": lambda: {
        "task": "text-completion",
        "engine": "llama-cpp",
        "location": str(model_path("smollm2")),
        "device": {"threads": 1, "batch_threads": 1},  # ggml's spin-waiting crawls on busy shared cores
    },
    # the same engine with two slots: every job goes through a sequence of a shared context, its steps
    # through rounds (engines/llama_cpp/rounds.py), and the worker runs calls on threads of their own
    "llama-cpp-slots": lambda: {
        "task": "text-completion",
        "engine": "llama-cpp",
        "location": str(model_path("smollm2")),
        "slots": 2,
        "context_size": 2048,
        "device": {"threads": 1, "batch_threads": 1},
    },
    "gpt4all": lambda: {
        "task": "text-completion",
        "engine": "gpt4all",
        "location": str(model_path("smollm2-gpt4all")),
        "context_size": 2048,
        "device": {"threads": 1},  # ggml spin-waits: one thread holds up best on shared CPUs
    },
}

# Engine/backend name -> a function giving the model dict the embedding contract suite runs on
# (tests/engines/test_embedding_contract.py; what each one claims is in CAPABILITIES there).
EMBEDDING_MODELS: dict[str, Callable[[], dict[str, Any]]] = {
    "st-torch": lambda: {"task": "embedding", "engine": "sentence-transformers", "location": str(model_path("minilm"))},
    "st-onnx": lambda: {
        "task": "embedding",
        "engine": "sentence-transformers",
        "backend": "onnx",
        "file_name": "onnx/model_qint8.onnx",
        "location": str(model_path("minilm-onnx")),
    },
    # pooled llama.cpp embeddings from a chat GGUF: weak vectors, but the real path (576 dimensions)
    "llama-cpp": lambda: {
        "task": "embedding",
        "engine": "llama-cpp",
        "location": str(model_path("smollm2")),
        "context_size": 512,
        "device": {"threads": 1, "batch_threads": 1},
    },
}
