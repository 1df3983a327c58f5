"""What every llama-cpp engine class (text, embedding, rerank) declares alike about where it runs and what
it holds: one mixin, so the three classes cannot drift apart."""

from __future__ import annotations

from typing import Any, ClassVar

from lllmsd.config import LlamaCppModelConfig
from lllmsd.engines.base import ModelFiles
from lllmsd.engines.llama_cpp.memory import gguf_estimate
from lllmsd.engines.llama_cpp.model import gpu_warnings


class LlamaResources:
    """Placement report, GPU warnings and the GGUF memory estimate. Put it before the engine base class."""

    # whether the model loads for pooled outputs (embedding, rank), which sizes its buffers differently
    pooled_outputs: ClassVar[bool] = False
    _placement: dict[str, Any]

    def placement(self, _: object = None) -> dict[str, Any]:
        return self._placement

    @classmethod
    def config_warnings(cls, config: LlamaCppModelConfig) -> list[tuple[str, str]]:
        return gpu_warnings(config)

    @classmethod
    def estimate_memory(cls, config: LlamaCppModelConfig, files: ModelFiles) -> int | None:
        return gguf_estimate(config, files, embedding=cls.pooled_outputs).total
