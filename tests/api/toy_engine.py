"""A toy engine that lives in the test tree: everything docs/architecture.md says a new engine needs.

It is its module (this file: the engine class with its declaration), its config class, and one registry
line (``toy_engines``). No production file knows it. It answers chat and completions with the request's
last text reversed, one character per token, and declares one optional feature, ``seed`` (its output
never varies, so any seed is honoured).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Literal

from pydantic import Field

from lllmsd.config import ModelBase
from lllmsd.core.jobs import (
    ChatJob,
    ChoiceEnd,
    CompletionJob,
    Feature,
    GenerationEvent,
    Job,
    Preload,
    TextDelta,
    Usage,
)
from lllmsd.engines.base import ModelFiles, TextEngine
from lllmsd.engines.registry import EngineRegistry, EngineSpec, builtin_engines
from lllmsd.errors import InvalidRequest


class ToyModelConfig(ModelBase):
    """The toy engine's options: every shared option, plus its own."""

    engine: Literal["toy"] = Field(description="Engine that runs the model.")
    shout: bool = Field(False, description="Answer in capitals.")

    def needs_source(self) -> bool:
        return False


class ToyEngine(TextEngine):
    name = "toy"
    features = frozenset({Feature.SEED})

    def __init__(self, config: ToyModelConfig, files: ModelFiles) -> None:
        super().__init__(config, files)
        self.shout = config.shout

    @classmethod
    def check_job(cls, config: ModelBase, job: Job) -> None:
        if isinstance(job, CompletionJob) and not job.prompt:
            raise InvalidRequest("the toy engine needs a prompt to reverse", param="prompt")

    @classmethod
    def config_problems(cls, config: ModelBase) -> list[tuple[str, str]]:
        return [("context_size", "the toy engine has no context to size")] if config.context_size else []

    def preload(self, preload: Preload) -> int:
        return 0

    def chat(self, job: ChatJob, cancel: threading.Event) -> Iterator[GenerationEvent]:
        return self._reverse(job.messages[-1].content or "", job.sampling.max_tokens, cancel)

    def complete(self, job: CompletionJob, cancel: threading.Event) -> Iterator[GenerationEvent]:
        return self._reverse(job.prompt, job.sampling.max_tokens, cancel)

    def _reverse(self, text: str, max_tokens: int | None, cancel: threading.Event) -> Iterator[GenerationEvent]:
        answer = text[::-1].upper() if self.shout else text[::-1]
        limit = len(answer) if max_tokens is None else min(max_tokens, len(answer))
        for char in answer[:limit]:
            if cancel.is_set():
                return
            yield TextDelta(char)
        yield ChoiceEnd("length" if limit < len(answer) else "stop")
        yield Usage(prompt_tokens=len(text), completion_tokens=limit)


def toy_engines() -> EngineRegistry:
    """The built-in engines plus this one: the registry line."""
    return builtin_engines().with_engine(EngineSpec("toy", (ToyEngine,), ToyModelConfig))
