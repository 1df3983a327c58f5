"""The global cap on jobs running at once, shared by every model's pool.

A pool hands a waiting request an instance and a slot in the same synchronous step (``ModelPool._dispatch``),
so an instance shown as busy is really running a job: no request ever holds an instance while it waits for
a slot, or a slot while it waits for an instance. When a slot frees, the pools whose oldest waiter has
waited longest are asked to dispatch first, which keeps the cap first come, first served across models.

Concurrency rule: used only on the event loop thread, by synchronous methods; no lock is needed.
"""

from __future__ import annotations

from typing import Protocol


class SlotWaiter(Protocol):
    """A pool, as the limiter sees it."""

    def oldest_waiter_since(self) -> float | None:
        """When its longest-waiting request arrived (injected clock), None if none waits."""
        ...

    def dispatch(self) -> None:
        """Hand out instances and slots to its waiters, as far as both allow."""
        ...


class ConcurrencyLimit:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._pools: list[SlotWaiter] = []

    @property
    def free(self) -> bool:
        return self.in_use < self.limit

    def take(self) -> None:
        assert self.free, "take() only after checking free"
        self.in_use += 1

    def give_back(self) -> None:
        self.in_use -= 1
        self.wake()

    def subscribe(self, pool: SlotWaiter) -> None:
        self._pools.append(pool)

    def unsubscribe(self, pool: SlotWaiter) -> None:
        if pool in self._pools:
            self._pools.remove(pool)

    def wake(self) -> None:
        """Offer free slots to the pools in the order their oldest waiters arrived."""
        waiting = [
            (since, i) for i, pool in enumerate(self._pools) if (since := pool.oldest_waiter_since()) is not None
        ]
        for _, index in sorted(waiting):
            if not self.free:
                return
            self._pools[index].dispatch()
