"""ModelStore against a local server that answers like the Hub (tests/hubserver.py): downloads, sharing,
resume, verification, failures and retries, folders, caches shared by two daemons, offline mode, tokens."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path
from typing import Any

import pytest

from lllmsd.config import parse_config
from lllmsd.core.store import ModelStore
from lllmsd.errors import ModelUnavailable, ShuttingDown
from tests.api.probe import eventually
from tests.hubserver import FakeHub, files_under, payload

SIZE = 16 * 1024


def model(**source: Any) -> Any:
    return parse_config({"models": {"m": {"engine": "fake", "task": "text-completion", **source}}}).models["m"]


def store_for(hub: FakeHub, cache: Path, **options: Any) -> ModelStore:
    return ModelStore(cache, endpoint=hub.endpoint, **options)  # type: ignore[attr-defined]


async def test_waiters_share_one_download_that_resumes_after_a_cut(hub: FakeHub, tmp_path: Path) -> None:
    weights = hub.add("org/m", "m.gguf", payload(SIZE))
    weights.hold_after = 4096
    store = store_for(hub, tmp_path)
    config = model(repo="org/m", file="m.gguf", sha256=weights.sha256)

    waiters = [asyncio.ensure_future(store.files("m", config)) for _ in range(3)]
    await weights.started.wait()
    await eventually(lambda: store.status()[0]["bytes_done"] >= 4096)
    shown = store.status()
    assert [(s["model"], s["file"], s["state"], s["bytes_total"]) for s in shown] == [
        ("m", "m.gguf", "downloading", SIZE)
    ]
    assert not any(w.done() for w in waiters)

    weights.gate.set()
    paths = {(await w).path for w in waiters}
    assert len(paths) == 1
    path = paths.pop()
    assert path is not None
    assert path.read_bytes() == weights.data
    assert len(hub.gets("m.gguf")) == 1  # three waiters, one transfer
    assert store.status()[0]["state"] == "done"

    # resolved once: a later load does not ask the hub again
    before = len(hub.requests)
    assert (await store.files("m", config)).path == path
    assert len(hub.requests) == before


async def test_a_cut_connection_resumes_with_a_range_request(hub: FakeHub, tmp_path: Path) -> None:
    weights = hub.add("org/m", "m.gguf", payload(SIZE))
    weights.cut_after, weights.cuts = 5000, 1
    files = await store_for(hub, tmp_path).files("m", model(repo="org/m", file="m.gguf", sha256=weights.sha256))
    assert files.path is not None
    assert files.path.read_bytes() == weights.data
    ranges = [g.range for g in hub.gets("m.gguf")]
    assert ranges[0] is None
    assert ranges[1] is not None
    resumed_from = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_from <= 5000  # it kept what arrived and asked only for the rest


async def test_a_download_cut_every_time_fails_every_waiter_and_the_next_call_retries(
    hub: FakeHub, tmp_path: Path
) -> None:
    weights = hub.add("org/m", "m.gguf", payload(SIZE))
    weights.cut_after, weights.cuts = 3000, 1000
    store = store_for(hub, tmp_path)
    config = model(repo="org/m", file="m.gguf")

    results = await asyncio.gather(*(store.files("m", config) for _ in range(2)), return_exceptions=True)
    for result in results:
        assert isinstance(result, ModelUnavailable)
        assert result.status == 503
        assert "org/m/m.gguf@main" in result.message
        assert "peer closed connection" in result.message
    assert store.status()[0]["state"] == "failed"
    assert not files_under(tmp_path, "*.incomplete")  # nothing half-written is left behind

    weights.heal()
    files = await store.files("m", config)
    assert files.path is not None
    assert files.path.read_bytes() == weights.data
    assert store.status()[0]["state"] == "done"


async def test_a_corrupted_file_fails_its_sha256_check_and_is_deleted(hub: FakeHub, tmp_path: Path) -> None:
    weights = hub.add("org/m", "m.gguf", payload(SIZE))
    weights.corrupt = True
    store = store_for(hub, tmp_path)
    config = model(repo="org/m", file="m.gguf", sha256=weights.sha256.upper())

    with pytest.raises(ModelUnavailable) as caught:
        await store.files("m", config)
    actual = hashlib.sha256(weights.served()).hexdigest()
    assert f"expected sha256 {weights.sha256}, got {actual}" in caught.value.message
    assert not files_under(tmp_path, size=SIZE)  # blob gone
    assert not files_under(tmp_path, "m.gguf")  # and its snapshot link

    weights.heal()
    files = await store.files("m", config)
    assert files.path is not None
    assert files.path.read_bytes() == weights.data


async def test_a_whole_folder_model_takes_the_files_its_patterns_select(hub: FakeHub, tmp_path: Path) -> None:
    hub.add("org/st", "config.json", b'{"dims": 16}')
    hub.add("org/st", "1_Pooling/config.json", b'{"mean": true}')
    hub.add("org/st", "model.safetensors", payload(SIZE, "st"))
    hub.add("org/st", "pytorch_model.bin", payload(SIZE, "pt"))
    store = store_for(hub, tmp_path)
    config = model(repo="org/st", allow_patterns=["*.json", "*.safetensors"])

    folder = (await store.files("st", config)).path
    assert folder is not None
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "1_Pooling/config.json",
        "config.json",
        "model.safetensors",
    ]
    assert {s["file"]: s["state"] for s in store.status()} == {
        "1_Pooling/config.json": "done",
        "config.json": "done",
        "model.safetensors": "done",
    }
    assert not hub.gets("pytorch_model.bin")


async def test_a_listed_file_that_would_leave_the_cache_is_refused(hub: FakeHub, tmp_path: Path) -> None:
    hub.add("org/st", "config.json", b"{}")
    hub.repos["org/st"].extra_listing.append("../../../escaped.txt")
    with pytest.raises(ModelUnavailable, match="refusing a file the Hub listed"):
        await store_for(hub, tmp_path / "cache").files("st", model(repo="org/st"))
    assert not files_under(tmp_path, "escaped.txt")
    assert not hub.gets("config.json")  # refused before anything was fetched


async def test_two_daemons_sharing_a_cache_download_a_file_once(hub: FakeHub, tmp_path: Path) -> None:
    weights = hub.add("org/m", "m.gguf", payload(SIZE))
    weights.hold_after = 2048
    config = model(repo="org/m", file="m.gguf", sha256=weights.sha256)
    first, second = store_for(hub, tmp_path), store_for(hub, tmp_path)

    one = asyncio.ensure_future(first.files("m", config))
    await weights.started.wait()
    two = asyncio.ensure_future(second.files("m", config))  # waits on huggingface_hub's file lock
    await eventually(lambda: len([r for r in hub.requests if r.method == "HEAD"]) == 2)
    weights.gate.set()
    paths = [(await one).path, (await two).path]
    assert paths[0] == paths[1]
    assert paths[0] is not None
    assert paths[0].read_bytes() == weights.data
    assert len(hub.gets("m.gguf")) == 1


async def test_missing_repo_and_file_name_the_problem(hub: FakeHub, tmp_path: Path) -> None:
    hub.add("org/m", "m.gguf", b"x")
    store = store_for(hub, tmp_path)
    with pytest.raises(ModelUnavailable, match="repository org/none not found"):
        await store.files("a", model(repo="org/none", file="m.gguf"))
    with pytest.raises(ModelUnavailable, match=r"org/m/other.gguf@main not found"):
        await store.files("b", model(repo="org/m", file="other.gguf"))


async def test_offline_mode_serves_the_cache_and_names_what_is_missing(hub: FakeHub, tmp_path: Path) -> None:
    weights = hub.add("org/m", "m.gguf", payload(SIZE))
    config = model(repo="org/m", file="m.gguf")
    online = await store_for(hub, tmp_path).files("m", config)
    requests = len(hub.requests)

    offline = ModelStore(tmp_path, endpoint=hub.endpoint, offline=True)  # type: ignore[attr-defined]
    assert (await offline.files("m", config)).path == online.path
    with pytest.raises(ModelUnavailable, match="not in the cache and offline mode is on"):
        await offline.files("n", model(repo="org/m", file="absent.gguf"))
    assert len(hub.requests) == requests
    assert weights.data == online.path.read_bytes()  # type: ignore[union-attr]


async def test_the_endpoint_comes_from_hf_endpoint_and_a_token_is_sent_but_never_shown(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    hub.add("org/m", "m.gguf", b"weights")
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)  # type: ignore[attr-defined]
    monkeypatch.setenv("LLLMSD_TEST_TOKEN", "hf_sekrit")
    store = ModelStore(tmp_path)
    caplog.set_level(logging.DEBUG)
    await store.files("m", model(repo="org/m", file="m.gguf", token="${LLLMSD_TEST_TOKEN}"))
    with pytest.raises(ModelUnavailable) as caught:
        await store.files("x", model(repo="org/m", file="gone.gguf", token="${LLLMSD_TEST_TOKEN}"))
    assert {r.authorization for r in hub.requests} == {"Bearer hf_sekrit"}
    assert "hf_sekrit" not in caplog.text
    assert "hf_sekrit" not in str(store.status())
    assert "hf_sekrit" not in caught.value.message


async def test_a_location_is_used_as_is_and_checked_without_being_deleted(tmp_path: Path) -> None:
    weights = tmp_path / "w.gguf"
    weights.write_bytes(b"local weights")
    store = ModelStore(tmp_path / "cache", base_dir=tmp_path)
    assert (await store.files("m", model(location="w.gguf"))).path == weights
    with pytest.raises(ModelUnavailable, match=r"expected sha256 0{64}"):
        await store.files("bad", model(location="w.gguf", sha256="0" * 64))
    assert weights.exists()
    assert store.remove("m", model(location="w.gguf")) == 0
    assert weights.exists()
    with pytest.raises(ModelUnavailable, match="does not exist"):
        await store.files("gone", model(location="nope.gguf"))


async def test_close_stops_a_running_download(hub: FakeHub, tmp_path: Path) -> None:
    weights = hub.add("org/m", "m.gguf", payload(SIZE))
    weights.hold_after = 2048
    store = store_for(hub, tmp_path)
    waiter = asyncio.ensure_future(store.files("m", model(repo="org/m", file="m.gguf")))
    await weights.started.wait()
    await eventually(lambda: store.status()[0]["bytes_done"] > 0)
    closing = asyncio.ensure_future(store.close())
    weights.gate.set()  # the next chunk that arrives is where the thread notices
    await closing
    with pytest.raises(ShuttingDown):
        await waiter
    assert store.status()[0]["state"] == "cancelled"
    assert not files_under(tmp_path, size=SIZE)
