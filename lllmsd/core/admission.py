"""Admission: the one door from a handler into core.

A handler validates its wire body, then calls ``runtime.admit(model_id, kind, build)``. Admission:
1. looks the model up (404 if there is none);
2. refuses a request the model's task cannot serve (``UnsupportedTask``, 400, param ``model``): an
   embedding request to a chat model, a chat request to a Whisper model. A request core answers through
   another kind of job is served by the models of that job's task too (``JobKind.answered_through``: an
   embedding model ranks documents by cosine unless its ``rerank_by_cosine`` is off);
3. builds the job with the model's config (``build``: the wire schema's converter, which applies the
   model's defaults and limits);
4. refuses every feature the job uses that the engine class does not declare (``UnsupportedParameter``,
   400 naming the request parameter), then lets the engine check what only it can judge (``check_job``,
   which may hand back the job with what it built for it, a grammar, so that it is built once);
5. returns the job and the pool to send it to.

All of it happens before the request queues, so a request that cannot be served is refused at once,
never after it waited for an instance. Nothing here touches weights; the one step that can take a while
(the engine converting a large JSON Schema or grammar) runs on a thread, off the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from lllmsd.core.jobs import Feature, Job, JobKind
from lllmsd.errors import ModelNotFound, UnsupportedParameter, UnsupportedTask

if TYPE_CHECKING:
    from lllmsd.core.pool import ModelPool
    from lllmsd.engines.base import Engine

J = TypeVar("J", bound=Job)

# what a client asked for, in the words of the error message
_REQUESTS = {
    JobKind.CHAT: "chat completions",
    JobKind.COMPLETION: "completions",
    JobKind.EMBEDDING: "embeddings",
    JobKind.TRANSCRIPTION: "audio transcriptions or translations",
    JobKind.SPEECH: "speech",
    JobKind.RERANK: "rerank",
}


@dataclass(frozen=True, slots=True)
class Admission(Generic[J]):
    """Where an admitted request goes: its job, and the pool of the model that runs it."""

    job: J
    pool: ModelPool

    @property
    def config(self) -> Any:
        return self.pool.config


async def admit(
    pools: Mapping[str, ModelPool], model_id: str, kind: JobKind, build: Callable[[Any], J]
) -> Admission[J]:
    pool = pools.get(model_id)
    if pool is None:
        raise ModelNotFound(model_id)
    config, engine = pool.config, pool.engine_class
    if not serves(config, engine, kind):
        off = kind.answered_through(config.task) is not None  # it could, but its config turned it off
        raise UnsupportedTask(
            f"model '{model_id}' is a {config.task.value} model and cannot serve {_REQUESTS[kind]}"
            + (" (rerank_by_cosine is off for it)" if off else ""),
            param="model",
        )
    job = build(config)
    refuse_undeclared_features(engine, job)
    if engine.heavy_check(config, job):
        # turning a JSON Schema or grammar into the engine's form can take a while on a large one:
        # off the event loop, so other requests are not held up meanwhile
        checked = await asyncio.to_thread(engine.check_job, config, job)
    else:
        checked = engine.check_job(config, job)
    return Admission(checked or job, pool)  # the engine's own job, if it built something for it


def serves(config: Any, engine: type[Engine], kind: JobKind) -> bool:
    """Whether a model (its config and engine class) takes requests of ``kind``: its engine runs them, or
    core answers them through a kind of job its engine runs (rerank by cosine on an embedding model)."""
    if kind.task is config.task:
        return kind in engine.serves
    through = kind.answered_through(config.task)
    return through is not None and through in engine.serves and getattr(config, "rerank_by_cosine", False)


def check_job(engine: type[Engine], config: Any, job: J) -> J:
    """Refuse what ``engine`` cannot honour in ``job``: every feature it does not declare, then its own
    checks; the job admission would run. What admission checks (on the calling thread: the engine
    contract tests use it)."""
    refuse_undeclared_features(engine, job)
    return engine.check_job(config, job) or job


def refuse_undeclared_features(engine: type[Engine], job: Job) -> None:
    for feature, param in job.features_used():
        if feature not in engine.features:
            raise UnsupportedParameter(param, engine.name, _FEATURE_DETAIL.get(feature, ""))


_FEATURE_DETAIL = {
    Feature.ECHO_LOGPROBS: "no logprobs for an echoed prompt",
    Feature.PENALTIES: "use repeat_penalty",
    Feature.TOKEN_INPUT: "send the text",
}
