"""ResponseStore on real SQLite files: round trips, retention on an injected clock, and every way the
database can fail (locked, full, corrupt), each a ResponseStoreError that the next call recovers from."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lllmsd.core.clock import ManualClock
from lllmsd.core.jobs import ChatMessage, ToolCall
from lllmsd.core.response_store import ResponseStore, ResponseStoreError, Retention, StoredResponse

KEEP_ALL = Retention()


def stored(response_id: str, created_at: float, *history: ChatMessage) -> StoredResponse:
    return StoredResponse(
        id=response_id,
        created_at=created_at,
        model="chat",
        response={"id": response_id, "output": []},
        input_items=[{"id": "msg_1", "type": "message", "role": "user", "content": []}],
        history=history or (ChatMessage("user", "hi"),),
        previous_response_id=None,
        instance_id="chat-1",
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def store(tmp_path: Path, clock: ManualClock) -> AsyncIterator[ResponseStore]:
    store = ResponseStore(tmp_path / "state" / "responses.sqlite3", clock)
    yield store
    await store.close()


async def test_a_response_round_trips_with_its_whole_history(store: ResponseStore, clock: ManualClock) -> None:
    history = (
        ChatMessage("user", "weather?"),
        ChatMessage("assistant", None, tool_calls=(ToolCall("call_1", "get_weather", '{"city":"Oslo"}'),)),
        ChatMessage("tool", "sunny", name="get_weather", tool_call_id="call_1"),
        ChatMessage("assistant", "It is sunny."),
    )
    await store.save(stored("resp_1", clock.wall(), *history), KEEP_ALL)
    got = await store.get("resp_1")
    assert got == stored("resp_1", clock.wall(), *history)
    assert await store.get("resp_2") is None


async def test_delete_says_whether_it_was_there(store: ResponseStore, clock: ManualClock) -> None:
    await store.save(stored("resp_1", clock.wall()), KEEP_ALL)
    assert await store.delete("resp_1") is True
    assert await store.get("resp_1") is None
    assert await store.delete("resp_1") is False


async def test_state_survives_closing_and_reopening(tmp_path: Path, clock: ManualClock) -> None:
    path = tmp_path / "responses.sqlite3"
    first = ResponseStore(path, clock)
    await first.save(stored("resp_1", clock.wall()), KEEP_ALL)
    await first.close()
    second = ResponseStore(path, clock)
    try:
        got = await second.get("resp_1")
        assert got is not None
        assert got.instance_id == "chat-1"
    finally:
        await second.close()


async def test_retention_by_age_follows_the_injected_clock(store: ResponseStore, clock: ManualClock) -> None:
    retention = Retention(max_age=100)
    await store.save(stored("resp_old", clock.wall()), retention)
    clock.advance(60)
    await store.save(stored("resp_new", clock.wall()), retention)
    clock.advance(60)  # resp_old is 120 s old, resp_new 60 s
    assert await store.sweep(retention) == 1
    assert await store.get("resp_old") is None
    assert await store.get("resp_new") is not None


async def test_retention_by_count_keeps_the_newest_and_the_one_being_saved(
    store: ResponseStore, clock: ManualClock
) -> None:
    for n in range(4):
        await store.save(stored(f"resp_{n}", clock.wall()), KEEP_ALL)
        clock.advance(1)
    await store.save(stored("resp_4", clock.wall()), Retention(max_count=2))
    kept = [n for n in range(5) if await store.get(f"resp_{n}") is not None]
    assert kept == [3, 4]
    # a response whose clock says it is older than all the rest is still kept when it is the one saved
    await store.save(stored("resp_backdated", clock.wall() - 1000), Retention(max_count=1))
    assert await store.get("resp_backdated") is not None


async def test_a_corrupt_file_is_an_error_until_it_is_replaced(tmp_path: Path, clock: ManualClock) -> None:
    path = tmp_path / "responses.sqlite3"
    path.write_bytes(b"garbage" * 1000)
    store = ResponseStore(path, clock)
    try:
        with pytest.raises(ResponseStoreError, match="corrupt") as failed:
            await store.get("resp_1")
        assert failed.value.status == 503
        with pytest.raises(ResponseStoreError):
            await store.save(stored("resp_1", clock.wall()), KEEP_ALL)
        path.unlink()
        await store.save(stored("resp_1", clock.wall()), KEEP_ALL)
        assert await store.get("resp_1") is not None
    finally:
        await store.close()


async def test_a_locked_database_is_an_error_and_then_works_again(
    store: ResponseStore, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lllmsd.core.response_store.BUSY_TIMEOUT_SECONDS", 0.05)  # read when it connects
    await store.save(stored("resp_1", clock.wall()), KEEP_ALL)
    holder = sqlite3.connect(store.path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(ResponseStoreError, match="locked"):
            await store.save(stored("resp_2", clock.wall()), KEEP_ALL)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    await store.save(stored("resp_2", clock.wall()), KEEP_ALL)
    assert await store.get("resp_1") is not None  # nothing acknowledged was lost


async def test_a_full_database_is_an_error_and_keeps_what_was_stored(store: ResponseStore, clock: ManualClock) -> None:
    await store.save(stored("resp_1", clock.wall()), KEEP_ALL)

    def fill_up() -> None:  # what a full disk looks like to SQLite: no page can be added
        db = store._db()
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")

    await store._run(fill_up)  # on the store's own thread and connection
    big = stored("resp_big", clock.wall(), ChatMessage("user", "x" * 200_000))
    with pytest.raises(ResponseStoreError, match="full"):
        await store.save(big, KEEP_ALL)
    assert await store.get("resp_1") is not None
    assert await store.get("resp_big") is None
