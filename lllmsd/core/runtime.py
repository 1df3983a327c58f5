"""Runtime: everything one daemon runs, built from one config. No globals: tests build one per config.

It owns the store, one ModelPool per model (the pool knows its config and engine class: there is one
routing table, ``pools``), the global concurrency limiter and the memory budget shared by all pools
(core/limit.py, core/budget.py), and the background reaper.
The HTTP layer reaches models only through ``runtime.admit`` (core/admission.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lllmsd.config import DaemonConfig
from lllmsd.core.admission import Admission, J, admit, serves
from lllmsd.core.budget import MemoryBudget, budget_bytes
from lllmsd.core.clock import Clock, SystemClock
from lllmsd.core.instance import InstanceState
from lllmsd.core.jobs import JobKind
from lllmsd.core.limit import ConcurrencyLimit
from lllmsd.core.pool import ModelPool
from lllmsd.core.store import ModelStore
from lllmsd.engines.base import Engine, ModelFiles
from lllmsd.engines.registry import EngineRegistry, builtin_engines

log = logging.getLogger(__name__)

REAP_INTERVAL = 1.0
# Settings a running daemon cannot change (the socket, the shared limiter, the store, the app's body
# limit): a reload keeps the running values and says a restart is needed.
RESTART_ONLY = ("listen", "concurrency", "cache_dir", "max_body_size", "client_timeout", "max_connections")


@dataclass(frozen=True)
class ReloadResult:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    replaced: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    restart_needed: tuple[str, ...] = ()
    settings_changed: tuple[str, ...] = ()  # daemon settings that took effect at once (max_audio_size, ...)

    def summary(self) -> str:
        parts = [
            f"{name} {', '.join(ids)}"
            for name, ids in (("added", self.added), ("removed", self.removed), ("replaced", self.replaced))
            if ids
        ]
        text = "; ".join(parts) or "no model changed"
        if self.settings_changed:
            text += f"; {', '.join(self.settings_changed)} changed"
        if self.restart_needed:
            text += f" ({', '.join(self.restart_needed)} changed: takes effect after a restart)"
        return text


class Runtime:
    def __init__(
        self,
        config: DaemonConfig,
        *,
        engines: EngineRegistry | None = None,
        clock: Clock | None = None,
        store: ModelStore | None = None,
        base_dir: Path | None = None,
        reap_interval: float | None = REAP_INTERVAL,
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.store = store or ModelStore(config.cache_dir, base_dir=base_dir, clock=self.clock)
        self.engines = engines or builtin_engines()
        self._reap_interval = reap_interval
        self.limiter = ConcurrencyLimit(config.concurrency)
        self.budget = MemoryBudget(budget_bytes(config.memory_budget))
        self.pools: dict[str, ModelPool] = {}
        self._reaper: asyncio.Task[None] | None = None
        self.started_at = self.clock.wall()
        # pools of removed or replaced models, serving what they already hold until idle (see reload)
        self.retiring: list[ModelPool] = []
        self._closing: set[asyncio.Task[None]] = set()
        self._reload_lock = asyncio.Lock()

    async def start(self) -> None:
        for model_id, model in self.config.models.items():
            engine_class = await self._load_engine_class(model)
            self.pools[model_id] = self._make_pool(model_id, model, engine_class)
        await self._prepare(self.config.models)
        for pool in self.pools.values():
            pool.start()
        if self._reap_interval:
            self._reaper = asyncio.create_task(self._reap_forever(self._reap_interval))

    async def _prepare(self, models: Mapping[str, Any]) -> None:
        """Start the models' downloads as their ``prepare`` says: ``blocking`` ones are awaited here (start()
        runs before the server listens), ``async`` ones go on in the background, ``on-demand`` ones wait
        for their first request. A failed blocking download is logged; that model's requests retry it."""
        blocking = {m: cfg for m, cfg in models.items() if cfg.prepare == "blocking"}
        for model_id, cfg in models.items():
            if cfg.prepare == "async":
                self.store.prefetch(model_id, cfg)
        results = await asyncio.gather(
            *(self.store.files(m, cfg) for m, cfg in blocking.items()), return_exceptions=True
        )
        for model_id, result in zip(blocking, results, strict=True):
            if isinstance(result, BaseException):
                log.error("%s: not ready at start-up: %s", model_id, getattr(result, "message", result))

    async def _load_engine_class(self, model: Any) -> type[Engine]:
        # importing an engine module can pull in its library (llama_cpp, ctranslate2): not on the event loop
        return await asyncio.to_thread(self.engines[model.engine].class_for, model.task)

    def _make_pool(self, model_id: str, model: Any, engine_class: type[Engine]) -> ModelPool:
        async def files() -> ModelFiles:
            return await self.store.files(model_id, model)

        preload = model.preload.to_preload() if model.preload is not None else None
        return ModelPool(
            model_id,
            model,
            engine_class,
            files=files,
            limiter=self.limiter,
            clock=self.clock,
            preload=preload,
            budget=self.budget,
        )

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        pools = [*self.pools.values(), *self.retiring]
        self.retiring = []
        await asyncio.gather(*(p.close(self.config.shutdown_grace) for p in pools), *self._closing)
        await self.store.close()  # stops downloads nobody waits for any more

    def reap(self) -> None:
        for pool in self.pools.values():
            pool.reap()
        self._close_drained()

    # ------------------------------------------------------------------------------------------ reload

    async def reload(self, config: DaemonConfig) -> ReloadResult:
        """Serve ``config`` from now on: added models get a pool; removed and changed ones leave the routing
        table at once (new requests see 404 or the new settings) while their old pool finishes the
        requests it runs or queues, and is disposed once idle. ``config`` must be valid already; if an
        engine cannot be imported nothing changes."""
        async with self._reload_lock:
            old, new = self.config.models, config.models
            added = tuple(m for m in new if m not in old)
            removed = tuple(m for m in old if m not in new)
            replaced = tuple(m for m in new if m in old and new[m] != old[m])
            # every engine first: a failure here leaves the running config untouched
            classes = {m: await self._load_engine_class(new[m]) for m in added + replaced}
            restart = tuple(name for name in RESTART_ONLY if getattr(config, name) != getattr(self.config, name))
            settings = tuple(
                name
                for name in type(self.config).model_fields
                if name not in (*RESTART_ONLY, "models") and getattr(config, name) != getattr(self.config, name)
            )
            self.config = config.model_copy(update={name: getattr(self.config, name) for name in RESTART_ONLY})
            if "memory_budget" in settings:
                self.budget.limit = budget_bytes(config.memory_budget)
                self.budget.settle()
            for model_id in removed + replaced:
                self.retiring.append(self.pools.pop(model_id))
            for model_id in added + replaced:
                self.pools[model_id] = self._make_pool(model_id, new[model_id], classes[model_id])
                self.pools[model_id].start()
                if new[model_id].prepare != "on-demand":  # a reload never waits for a download
                    self.store.prefetch(model_id, new[model_id])
            self.pools = {m: self.pools[m] for m in new}  # listed in the config's order
            self._close_drained()
            unchanged = tuple(m for m in new if m not in added + replaced)
            return ReloadResult(added, removed, replaced, unchanged, restart, settings)

    def _close_drained(self) -> None:
        """Dispose the retiring pools that no request uses or waits for any more."""
        for pool in list(self.retiring):
            if pool.waiting or any(i.state is InstanceState.BUSY for i in pool.instances):
                continue
            self.retiring.remove(pool)
            log.info("%s: previous configuration drained, unloading its instances", pool.model_id)
            task = asyncio.ensure_future(pool.close(0))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def wait_closed(self) -> None:
        """Until every drained pool is disposed (tests, shutdown)."""
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    async def _reap_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.reap()
            except Exception:  # the reaper must outlive any one bad step
                log.exception("reaper step failed")

    # ------------------------------------------------------------------------------------------ access

    async def admit(self, model_id: str, kind: JobKind, build: Callable[[Any], J]) -> Admission[J]:
        """The one way a request reaches a model: see core/admission.py."""
        return await admit(self.pools, model_id, kind, build)

    def status(self) -> dict[str, Any]:
        models = {}
        for model_id, pool in self.pools.items():
            model = pool.config
            engine = pool.engine_class
            models[model_id] = {
                "engine": model.engine,
                "task": model.task.value,
                "serves": sorted(kind.value for kind in JobKind if serves(model, engine, kind)),
                "features": sorted(feature.value for feature in engine.features),
                "state": _model_state(pool),
                **pool.status(),
            }
        return {
            "uptime_seconds": round(self.clock.wall() - self.started_at, 3),
            "concurrency": {"limit": self.config.concurrency, "in_use": self.limiter.in_use},
            "memory": self.budget.status(),
            "models": models,
            # the previous configuration of removed or changed models, until its last request ends
            "retiring": [{"model": pool.model_id, **pool.status()} for pool in self.retiring],
            "downloads": self.store.status(),
        }


def _model_state(pool: ModelPool) -> str:
    states = {i.state.value for i in pool.instances}
    if "busy" in states:
        return "busy"
    if "idle" in states:
        return "ready"
    if "loading" in states:
        return "loading"
    return "error" if pool.status()["last_error"] else "unloaded"
