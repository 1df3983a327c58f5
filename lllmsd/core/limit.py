"""The global cap on engine tasks running at once, shared by every model's pool."""

from __future__ import annotations

import asyncio
from types import TracebackType


class ConcurrencyLimit:
    """A semaphore that can say how many of its slots are taken (for GET / and /metrics).

    Concurrency rule: used only on the event loop; ``in_use`` changes only around the semaphore.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._semaphore = asyncio.Semaphore(limit)

    async def __aenter__(self) -> None:
        await self._semaphore.acquire()
        self.in_use += 1

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.in_use -= 1
        self._semaphore.release()
