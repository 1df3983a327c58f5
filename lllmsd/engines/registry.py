"""Which engines exist, what each can do, and how to import one only when a model needs it.

Engine modules import heavy optional libraries (llama_cpp, torch, ctranslate2). Nothing here imports
them: the config is checked against this table (tasks, installed extra) before any engine loads, so a
missing optional dependency is a config error that names the pip command, not an ImportError at startup.
A new engine is one module plus one entry below.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from lllmsd.core.tasks import ModelTask


@dataclass(frozen=True)
class EngineSpec:
    name: str
    target: str  # "module:Class"
    tasks: frozenset[ModelTask]
    extra: str | None  # the pyproject extra that installs its libraries
    requires: tuple[str, ...] = ()  # top-level modules the engine imports

    def missing_modules(self) -> list[str]:
        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    def install_hint(self) -> str:
        return f"pip install 'lllmsd[{self.extra}]'" if self.extra else ""

    def load_class(self) -> type:
        module_name, _, class_name = self.target.partition(":")
        return getattr(importlib.import_module(module_name), class_name)


_TEXT = ModelTask.TEXT_COMPLETION
_EMBED = ModelTask.EMBEDDING
_STT = ModelTask.SPEECH_TO_TEXT

ENGINES: Mapping[str, EngineSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            EngineSpec("fake", "lllmsd.engines.fake:FakeEngine", frozenset({_TEXT, _EMBED, _STT}), None),
            EngineSpec(
                "llama-cpp",
                "lllmsd.engines.llama_cpp:LlamaCppEngine",
                frozenset({_TEXT, _EMBED}),
                "llama-cpp",
                ("llama_cpp",),
            ),
            EngineSpec(
                "gpt4all",
                "lllmsd.engines.gpt4all:Gpt4AllEngine",
                frozenset({_TEXT}),
                "gpt4all",
                ("gpt4all",),
            ),
            EngineSpec(
                "sentence-transformers",
                "lllmsd.engines.sentence_transformers:SentenceTransformersEngine",
                frozenset({_EMBED}),
                "sentence-transformers",
                ("sentence_transformers",),
            ),
            EngineSpec(
                "faster-whisper",
                "lllmsd.engines.faster_whisper:FasterWhisperEngine",
                frozenset({_STT}),
                "faster-whisper",
                ("faster_whisper",),
            ),
        )
    }
)
