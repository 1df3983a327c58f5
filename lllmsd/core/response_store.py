"""ResponseStore: stored Responses API answers, in an embedded SQLite database, so chains outlive restarts.

One row per stored response: the Response object as it was answered (opaque JSON to this module), the
input items of its turn, the conversation it ends (``history``: every message of the chain so far,
without instructions, its own output included), the model, and the instance that last held the
conversation in its KV cache. Each row holds its whole history, so a chained request needs one row, and
deleting or sweeping an earlier response of a chain never breaks the later ones.

Nothing is kept in process memory only: a restarted daemon on the same file answers what the old one
stored. Retention (age and count) is applied after each write, with the injected clock's wall time.

Concurrency rules: every SQLite call runs on this store's one worker thread (a single-thread executor
owning the one connection), never on the event loop; calls are serialised there, so the connection needs
no lock. A database that is locked by another process, full, read-only or corrupt raises
``ResponseStoreError`` to the one request that touched it; the next call tries again (a failed open is
retried, a broken connection reopened), and the daemon keeps serving everything else.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from lllmsd.core.clock import Clock
from lllmsd.core.jobs import ChatMessage, ToolCall
from lllmsd.errors import ServiceUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
BUSY_TIMEOUT_SECONDS = 2.0  # how long a write waits for another process's lock before it is an error
_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    model TEXT NOT NULL,
    previous_response_id TEXT,
    instance_id TEXT,
    response TEXT NOT NULL,
    input_items TEXT NOT NULL,
    history TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_created_at ON responses (created_at);
"""


class ResponseStoreError(ServiceUnavailable):
    """The response store could not be read or written (locked, full, read-only, corrupt)."""

    code = "response_store_unavailable"


@dataclass(frozen=True, slots=True)
class StoredResponse:
    id: str
    created_at: float
    model: str
    response: dict[str, Any]  # the Response object as answered
    input_items: list[dict[str, Any]]  # this turn's input items, with their ids
    history: tuple[ChatMessage, ...]  # the conversation this response ends, its output included
    previous_response_id: str | None = None
    instance_id: str | None = None  # which instance last held the conversation (informational)


@dataclass(frozen=True, slots=True)
class Retention:
    """What a sweep keeps: responses younger than ``max_age`` seconds, the newest ``max_count`` of them."""

    max_age: float | None = None
    max_count: int | None = None


class ResponseStore:
    def __init__(self, path: Path, clock: Clock) -> None:
        self.path = path
        self._clock = clock
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="response-store")
        self._connection: sqlite3.Connection | None = None  # touched only on the executor's thread

    # ----------------------------------------------------------------------------------- public (async)

    async def save(self, stored: StoredResponse, retention: Retention) -> None:
        await self._run(self._save, stored, retention)

    async def get(self, response_id: str) -> StoredResponse | None:
        return await self._run(self._get, response_id)

    async def delete(self, response_id: str) -> bool:
        """Whether a response with this id existed (and is now gone)."""
        return await self._run(self._delete, response_id)

    async def sweep(self, retention: Retention) -> int:
        """Apply retention now; the number of responses removed."""
        return await self._run(self._sweep, retention)

    async def close(self) -> None:
        await self._run(self._close)
        self._executor.shutdown(wait=True)

    # ----------------------------------------------------------------------------- the worker's side

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._guarded, fn, args)

    def _guarded(self, fn: Callable[..., T], args: Sequence[Any]) -> T:
        try:
            return fn(*args)
        except sqlite3.Error as exc:
            reason = _describe(exc)
            log.error("response store %s: %s", self.path, reason)
            self._drop_connection()  # a corrupt or replaced file: start afresh on the next call
            raise ResponseStoreError(f"the response store ({self.path}) cannot be used: {reason}") from None
        except (ValueError, KeyError) as exc:  # a row whose JSON is not what this module wrote
            log.error("response store %s: unreadable row: %s", self.path, exc)
            raise ResponseStoreError(f"the response store ({self.path}) holds an unreadable row: {exc}") from None
        except OSError as exc:  # the folder cannot be created
            log.error("response store %s: %s", self.path, exc)
            raise ResponseStoreError(f"the response store ({self.path}) cannot be used: {exc.strerror}") from None

    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
            try:
                connection.execute("PRAGMA journal_mode=WAL")  # readers do not wait for a writer
                connection.executescript(_SCHEMA)
            except sqlite3.Error:
                connection.close()
                raise
            self._connection = connection
        return self._connection

    def _drop_connection(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except sqlite3.Error:
                log.debug("closing a broken response store connection failed", exc_info=True)
            self._connection = None

    def _close(self) -> None:
        self._drop_connection()

    def _save(self, stored: StoredResponse, retention: Retention) -> None:
        db = self._db()
        with _transaction(db):
            db.execute(
                "INSERT OR REPLACE INTO responses (id, created_at, model, previous_response_id, instance_id, "
                "response, input_items, history) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    stored.id,
                    stored.created_at,
                    stored.model,
                    stored.previous_response_id,
                    stored.instance_id,
                    _dumps(stored.response),
                    _dumps(stored.input_items),
                    _dumps([message_to_json(m) for m in stored.history]),
                ),
            )
            self._sweep_in(db, retention, keep=stored.id)

    def _get(self, response_id: str) -> StoredResponse | None:
        row = (
            self._db()
            .execute(
                "SELECT id, created_at, model, previous_response_id, instance_id, response, input_items, history "
                "FROM responses WHERE id = ?",
                (response_id,),
            )
            .fetchone()
        )
        if row is None:
            return None
        return StoredResponse(
            id=row[0],
            created_at=row[1],
            model=row[2],
            previous_response_id=row[3],
            instance_id=row[4],
            response=json.loads(row[5]),
            input_items=json.loads(row[6]),
            history=tuple(message_from_json(m) for m in json.loads(row[7])),
        )

    def _delete(self, response_id: str) -> bool:
        db = self._db()
        with _transaction(db):
            return db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

    def _sweep(self, retention: Retention) -> int:
        db = self._db()
        with _transaction(db):
            return self._sweep_in(db, retention)

    def _sweep_in(self, db: sqlite3.Connection, retention: Retention, keep: str | None = None) -> int:
        removed = 0
        if retention.max_age is not None:
            cutoff = self._clock.wall() - retention.max_age
            removed += db.execute("DELETE FROM responses WHERE created_at < ? AND id IS NOT ?", (cutoff, keep)).rowcount
        if retention.max_count is not None:
            removed += db.execute(
                "DELETE FROM responses WHERE id NOT IN "
                "(SELECT id FROM responses ORDER BY created_at DESC, rowid DESC LIMIT ?) AND id IS NOT ?",
                (retention.max_count, keep),
            ).rowcount
        if removed:
            log.info("response store: retention removed %d stored responses", removed)
        return removed


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (the connection is in autocommit mode)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if kind is None:
            self._db.execute("COMMIT")
        elif self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                log.debug("rollback failed", exc_info=True)


def _describe(exc: sqlite3.Error) -> str:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return f"{text} (another process holds it; retry)"
    if "full" in text:
        return f"{text} (free some space or lower the responses retention)"
    if "not a database" in text or "malformed" in text:
        return f"{text} (the file is corrupt: move it away and the daemon starts a new one)"
    return text


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def message_to_json(message: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def message_from_json(data: dict[str, Any]) -> ChatMessage:
    return ChatMessage(
        role=data["role"],
        content=data.get("content"),
        name=data.get("name"),
        tool_calls=tuple(ToolCall(c["id"], c["name"], c["arguments"]) for c in data.get("tool_calls", ())),
        tool_call_id=data.get("tool_call_id"),
    )
