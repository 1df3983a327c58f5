"""Which engines exist, how to import one only when a model needs it, and the config they accept.

Engine modules import heavy optional libraries (llama_cpp, torch, ctranslate2) when a model loads, so
reading a class's declaration (engines/base.py) is cheap. The registry adds what only the installation
knows: the pyproject extra that installs an engine's libraries and the modules to look for, so a missing
optional dependency is a config error that names the pip command, not an ImportError at startup.

A new engine is its module, its config class and one ``EngineSpec`` line in ``builtin_engines``. Code
that brings its own engines (a test, a plugin) builds a registry with ``with_engine`` and passes it to
``parse_config`` and ``create_app``; nothing here is global.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Annotated, Any

from pydantic import Field, create_model

from lllmsd.config import (
    MODELS_DESCRIPTION,
    DaemonConfig,
    FakeModelConfig,
    FasterWhisperModelConfig,
    Gpt4AllModelConfig,
    LlamaCppModelConfig,
    ModelBase,
    PiperModelConfig,
    SentenceTransformersModelConfig,
)
from lllmsd.core.jobs import ModelTask
from lllmsd.engines.base import Engine

EngineClass = type[Engine]


@dataclass(frozen=True)
class EngineSpec:
    """One engine: its name in configs, its classes (one per model task it serves, as ``module:Class``
    targets imported on first use, or classes), its config class, and what installs its libraries."""

    name: str
    classes: tuple[str | EngineClass, ...]
    config_class: type[ModelBase]
    extra: str | None = None  # the pyproject extra that installs its libraries
    requires: tuple[str, ...] = ()  # top-level modules the engine imports

    def missing_modules(self) -> list[str]:
        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    def install_hint(self) -> str:
        return f"pip install 'lllmsd[{self.extra}]'" if self.extra else ""

    def load_classes(self) -> tuple[EngineClass, ...]:
        """The engine classes (imports their modules: call it off the event loop)."""
        return tuple(_load(target) for target in self.classes)

    def tasks(self) -> frozenset[ModelTask]:
        return frozenset().union(*(cls.tasks() for cls in self.load_classes()))

    def class_for(self, task: ModelTask) -> EngineClass:
        """The class that serves models configured for ``task``."""
        for cls in self.load_classes():
            if task in cls.tasks():
                return cls
        can = ", ".join(sorted(t.value for t in self.tasks()))
        raise LookupError(f"the {self.name} engine cannot do {task.value} (it does: {can})")


def _load(target: str | EngineClass) -> EngineClass:
    if not isinstance(target, str):
        return target
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


class EngineRegistry(Mapping[str, EngineSpec]):
    """Engines by name. Immutable: ``with_engine`` and ``with_classes`` return new registries."""

    def __init__(self, specs: Iterable[EngineSpec]) -> None:
        self._specs = {spec.name: spec for spec in specs}
        self._daemon_config: type[DaemonConfig] | None = None  # built on first use, then fixed

    def __getitem__(self, name: str) -> EngineSpec:
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def with_engine(self, spec: EngineSpec) -> EngineRegistry:
        return EngineRegistry([*(s for s in self._specs.values() if s.name != spec.name), spec])

    def with_classes(self, classes: Mapping[str, EngineClass]) -> EngineRegistry:
        """The same engines, some served by other classes (tests pass instrumented subclasses)."""
        return EngineRegistry(
            replace(spec, classes=(classes[name],)) if name in classes else spec for name, spec in self._specs.items()
        )

    def daemon_config_class(self) -> type[DaemonConfig]:
        """DaemonConfig whose ``models`` accept exactly these engines' config classes, by ``engine:``."""
        if self._daemon_config is None:
            configs = tuple(dict.fromkeys(spec.config_class for spec in self._specs.values()))
            model: Any = configs[0] if len(configs) == 1 else Annotated[_union(configs), Field(discriminator="engine")]
            self._daemon_config = create_model(
                "DaemonConfig",
                __base__=DaemonConfig,
                models=(dict[str, model], Field(default_factory=dict, description=MODELS_DESCRIPTION)),
            )
        return self._daemon_config


def _union(types: tuple[type, ...]) -> Any:
    result: Any = types[0]
    for item in types[1:]:
        result = result | item
    return result


def builtin_engines() -> EngineRegistry:
    return EngineRegistry(
        (
            EngineSpec("fake", ("lllmsd.engines.fake:FakeEngine",), FakeModelConfig),
            EngineSpec(
                "llama-cpp",
                (
                    "lllmsd.engines.llama_cpp.text:LlamaCppTextEngine",
                    "lllmsd.engines.llama_cpp.embedding:LlamaCppEmbeddingEngine",
                    "lllmsd.engines.llama_cpp.rerank:LlamaCppRerankEngine",
                ),
                LlamaCppModelConfig,
                "llama-cpp",
                ("llama_cpp",),
            ),
            EngineSpec(
                "gpt4all", ("lllmsd.engines.gpt4all:Gpt4AllEngine",), Gpt4AllModelConfig, "gpt4all", ("gpt4all",)
            ),
            EngineSpec(
                "sentence-transformers",
                (
                    "lllmsd.engines.sentence_transformers:SentenceTransformersEngine",
                    "lllmsd.engines.sentence_transformers_rerank:SentenceTransformersCrossEncoder",
                ),
                SentenceTransformersModelConfig,
                "sentence-transformers",
                ("sentence_transformers",),
            ),
            EngineSpec(
                "faster-whisper",
                ("lllmsd.engines.faster_whisper:FasterWhisperEngine",),
                FasterWhisperModelConfig,
                "faster-whisper",
                ("faster_whisper",),
            ),
            EngineSpec("piper", ("lllmsd.engines.piper:PiperEngine",), PiperModelConfig, "piper", ("piper", "av")),
        )
    )
