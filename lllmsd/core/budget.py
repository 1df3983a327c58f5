"""The daemon's memory budget: no instance loads unless its estimate fits beside the others'.

Every instance of every model holds its estimate (core/estimate.py) in the budget from the moment its load
may start until its disposal has ended (a worker that is still exiting still holds its memory). A load
asks for room with ``request``; in order, first come first served across every model:
  1. if the estimate fits in what is free, it is reserved and the load starts;
  2. else, if instances already being disposed will free enough, it waits for them;
  3. else the least recently used idle instances of the other models are disposed (never below a
     model's ``min_instances``, never one whose model has requests waiting for it) until it would fit,
     and it waits for those disposals;
  4. else nothing idle can go: it waits until some instance is disposed (its TTL, or a busy one that
     becomes idle and can then be evicted). Meanwhile the model's requests wait in its FIFO queue, with
     its usual ``queue_timeout`` and ``max_waiting`` (503 / 429).
A load whose estimate exceeds the whole budget can never fit: it fails at once with a clear error.

Concurrency rule: like the pools and the limiter, the budget is used only on the event loop thread, by
synchronous methods: between a decision (this load fits, this instance goes) and its effect (the
reservation, the disposal started) there is no ``await``, so no lock is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lllmsd.config import parse_memory_budget
from lllmsd.errors import ModelUnavailable

if TYPE_CHECKING:
    from lllmsd.core.instance import ModelInstance

log = logging.getLogger(__name__)

DEFAULT_SHARE = 0.75  # of the machine's memory, when the config gives no memory_budget
RECENT_EVICTIONS = 20  # evictions GET / lists


class Evictor(Protocol):
    """A pool, as the budget sees it."""

    model_id: str

    def evictable(self) -> list[ModelInstance]:
        """Its idle instances that may be disposed to make room, least recently used first."""
        ...

    def evict(self, instance: ModelInstance) -> None:
        """Dispose ``instance`` now (synchronously started); the pool calls ``release`` when it is gone."""
        ...


@dataclass(eq=False)
class _Load:
    pool: Evictor
    instance: ModelInstance
    size: int
    future: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class MemoryBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[ModelInstance, int] = {}
        self._freeing: set[ModelInstance] = set()  # evicted, held until their disposal ends
        self._queue: deque[_Load] = deque()
        self._pools: list[Evictor] = []
        self.evictions = 0
        self.recent_evictions: deque[dict[str, Any]] = deque(maxlen=RECENT_EVICTIONS)

    # ------------------------------------------------------------------------------------------ pools

    def subscribe(self, pool: Evictor) -> None:
        self._pools.append(pool)

    def unsubscribe(self, pool: Evictor) -> None:
        if pool in self._pools:
            self._pools.remove(pool)

    # ------------------------------------------------------------------------------------------ loads

    @property
    def used(self) -> int:
        return sum(self._held.values())

    def held_by(self, instance: ModelInstance) -> int | None:
        return self._held.get(instance)

    def waiting_for_room(self, instance: ModelInstance) -> bool:
        return any(load.instance is instance and not load.future.done() for load in self._queue)

    def fits_now(self, size: int) -> bool:
        """Whether ``size`` fits in what is free, with nothing evicted and nobody ahead of it."""
        return not self._queue and size <= self.limit - self.used

    async def request(self, pool: Evictor, instance: ModelInstance, size: int) -> None:
        """Until ``size`` bytes are reserved for ``instance``'s load (the caller loads right after)."""
        if size > self.limit:
            raise ModelUnavailable(
                f"model '{pool.model_id}' needs about {_mib(size)} per instance, more than the whole "
                f"memory_budget ({_mib(self.limit)}): raise memory_budget or use a smaller context or cache type"
            )
        load = _Load(pool, instance, size)
        self._queue.append(load)
        self.settle()
        if not load.future.done():
            log.info(
                "%s: instance %s waits for memory (needs %s; %s of %s in use)",
                pool.model_id,
                instance.id,
                _mib(size),
                _mib(self.used),
                _mib(self.limit),
            )
        try:
            await load.future
        except asyncio.CancelledError:
            # the load was abandoned while waiting (pool closing); if room was reserved in the same
            # instant, the pool's release gives it back
            with contextlib.suppress(ValueError):
                self._queue.remove(load)
            self.settle()
            raise

    def resize(self, instance: ModelInstance, size: int) -> None:
        """A loaded instance's estimate, replaced by what it was measured to take."""
        if instance in self._held:
            self._held[instance] = size
            self.settle()

    def release(self, instance: ModelInstance) -> None:
        """``instance`` is gone (disposed, or its load failed): its memory is free for the next load."""
        self._held.pop(instance, None)
        self._freeing.discard(instance)
        self.settle()

    def settle(self) -> None:
        """Start the queued loads that fit, in order, evicting idle instances for the first that does not.
        Pools call it when an instance becomes idle (it may now be evicted)."""
        while self._queue:
            head = self._queue[0]
            if head.future.done():
                self._queue.popleft()
                continue
            free = self.limit - self.used
            if head.size <= free:
                self._queue.popleft()
                self._held[head.instance] = head.size
                head.future.set_result(None)
                continue
            coming = sum(self._held.get(i, 0) for i in self._freeing)
            if head.size > free + coming:
                self._evict_for(head, head.size - free - coming)
            return  # the head waits (strict FIFO): for disposals under way, or for an instance to go idle

    def _evict_for(self, load: _Load, needed: int) -> None:
        candidates = sorted(
            (i for pool in self._pools if pool is not load.pool for i in pool.evictable() if i not in self._freeing),
            key=lambda i: i.last_used,
        )
        chosen: list[ModelInstance] = []
        for instance in candidates:
            if needed <= 0:
                break
            chosen.append(instance)
            needed -= self._held.get(instance, 0)
        if needed > 0:
            return  # even evicting every idle instance would not make room: evict nothing, wait
        pools = {id(i): pool for pool in self._pools for i in pool.evictable()}
        for instance in chosen:
            self._freeing.add(instance)
            self.evictions += 1
            self.recent_evictions.append(
                {
                    "instance": instance.id,
                    "model": instance.model_id,
                    "bytes": self._held.get(instance, 0),
                    "for": load.instance.id,
                    "at": round(instance.clock.wall()),
                }
            )
            log.info(
                "memory budget: disposing idle instance %s (%s, least recently used) to load %s",
                instance.id,
                _mib(self._held.get(instance, 0)),
                load.instance.id,
            )
            pools[id(instance)].evict(instance)

    # ----------------------------------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.limit,
            "used_bytes": self.used,
            "loads_waiting": sum(1 for load in self._queue if not load.future.done()),
            "evictions": self.evictions,
            "recent_evictions": list(self.recent_evictions),
        }


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------------ the machine


def machine_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its cgroup's limit if lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            text = Path(limit_file).read_text().strip()
            if text != "max":
                total = min(total, int(text))
    return total


def budget_bytes(setting: int | str | None, machine: int | None = None) -> int:
    """The config's ``memory_budget`` in bytes (null: DEFAULT_SHARE of the machine)."""
    machine = machine_memory() if machine is None else machine
    if setting is None:
        return int(machine * DEFAULT_SHARE)
    return parse_memory_budget(setting, machine=machine)
