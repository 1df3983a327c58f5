"""Reloading the config in a running daemon: added models appear, removed ones drain and unload, changed
ones are replaced once idle, a bad file is refused and the old config keeps serving."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import FormData
from aiohttp.test_utils import TestClient

from lllmsd.api.keys import RUNTIME
from lllmsd.core.instance import InstanceState
from lllmsd.core.runtime import Runtime
from lllmsd.server import reload_from_file
from tests.api.probe import eventually
from tests.conftest import AppFactory, fake_model, make_config

USER = [{"role": "user", "content": "one two three four"}]


def runtime_of(client: TestClient) -> Runtime:
    return client.app[RUNTIME]


async def chat(client: TestClient, model: str, **body: Any) -> tuple[int, dict[str, Any]]:
    response = await client.post("/v1/chat/completions", json={"model": model, "messages": USER, **body})
    return response.status, await response.json()


async def model_ids(client: TestClient) -> list[str]:
    return [m["id"] for m in (await (await client.get("/v1/models")).json())["data"]]


async def test_an_added_model_appears(start_app: AppFactory) -> None:
    client = await start_app(make_config({"a": fake_model()}))
    result = await runtime_of(client).reload(make_config({"a": fake_model(), "b": fake_model()}))
    assert (result.added, result.removed, result.replaced, result.unchanged) == (("b",), (), (), ("a",))
    assert await model_ids(client) == ["a", "b"]
    status, body = await chat(client, "b")
    assert status == 200
    assert body["choices"][0]["message"]["content"] == "one two three four"


async def test_a_removed_idle_model_is_gone_and_unloaded(start_app: AppFactory) -> None:
    client = await start_app(make_config({"a": fake_model(), "b": fake_model()}))
    runtime = runtime_of(client)
    assert (await chat(client, "b"))[0] == 200
    old_instance = runtime.pools["b"].instances[0]
    result = await runtime.reload(make_config({"a": fake_model()}))
    assert result.removed == ("b",)
    assert await model_ids(client) == ["a"]
    status, body = await chat(client, "b")
    assert status == 404
    assert body["error"]["code"] == "model_not_found"
    await runtime.wait_closed()
    assert old_instance.state is InstanceState.CLOSED
    assert runtime.retiring == []
    assert (await chat(client, "a"))[0] == 200  # the others never noticed


async def test_a_removed_busy_model_finishes_its_requests_then_unloads(start_app: AppFactory) -> None:
    client = await start_app(make_config({"a": fake_model(max_instances=1), "b": fake_model()}))
    runtime = runtime_of(client)
    pool = runtime.pools["a"]
    async with pool.acquire() as held:
        queued = asyncio.ensure_future(chat(client, "a"))  # waits for the held instance
        await eventually(lambda: pool.waiting == 1)
        await runtime.reload(make_config({"b": fake_model()}))
        assert (await chat(client, "a"))[0] == 404  # new requests no longer reach it
        runtime.reap()
        assert runtime.retiring == [pool]  # busy and with a waiter: it drains, it is not cut
        assert held.state is InstanceState.BUSY
    status, body = await queued  # the request queued before the reload is still served
    assert status == 200
    assert body["choices"][0]["message"]["content"] == "one two three four"
    runtime.reap()
    await runtime.wait_closed()
    assert runtime.retiring == []
    assert held.state is InstanceState.CLOSED
    assert "a" not in runtime.status()["models"]


async def test_a_changed_model_is_replaced_and_the_old_instance_unloads_once_idle(start_app: AppFactory) -> None:
    client = await start_app(make_config({"a": fake_model()}))
    runtime = runtime_of(client)
    old_pool = runtime.pools["a"]
    async with old_pool.acquire() as old_instance:
        result = await runtime.reload(make_config({"a": fake_model(completion_defaults={"max_tokens": 2})}))
        assert result.replaced == ("a",)
        status, body = await chat(client, "a")  # served by a new instance with the new settings
        assert status == 200
        assert body["choices"][0]["message"]["content"] == "one two"
        assert body["choices"][0]["finish_reason"] == "length"
        assert runtime.status()["retiring"][0]["model"] == "a"
        assert old_instance.state is InstanceState.BUSY
    runtime.reap()
    await runtime.wait_closed()
    assert old_instance.state is InstanceState.CLOSED
    assert runtime.pools["a"] is not old_pool
    assert runtime.status()["retiring"] == []


async def test_an_unchanged_model_keeps_its_instances(start_app: AppFactory) -> None:
    client = await start_app(make_config({"a": fake_model()}))
    runtime = runtime_of(client)
    assert (await chat(client, "a"))[0] == 200
    pool = runtime.pools["a"]
    result = await runtime.reload(make_config({"a": fake_model(), "b": fake_model()}))
    assert result.unchanged == ("a",)
    assert runtime.pools["a"] is pool
    assert pool.instances[0].state is InstanceState.IDLE


async def test_restart_only_settings_keep_their_running_values(start_app: AppFactory) -> None:
    client = await start_app(make_config({"a": fake_model()}, concurrency=2))
    runtime = runtime_of(client)
    result = await runtime.reload(make_config({"a": fake_model()}, concurrency=5, listen={"port": 4000}))
    assert set(result.restart_needed) == {"concurrency", "listen"}
    assert "restart" in result.summary()
    assert runtime.config.concurrency == 2
    assert runtime.status()["concurrency"]["limit"] == 2


async def test_new_api_keys_apply_at_once(start_app: AppFactory) -> None:
    client = await start_app(make_config({"a": fake_model()}))
    assert (await client.get("/v1/models")).status == 200
    await runtime_of(client).reload(make_config({"a": fake_model()}, api_keys=["sk-new"]))
    assert (await client.get("/v1/models")).status == 401
    assert (await client.get("/v1/models", headers={"Authorization": "Bearer sk-new"})).status == 200


def write_config(path: Path, models: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"models": models}))
    return path


async def test_reloading_a_file_adds_and_removes(start_app: AppFactory, tmp_path: Path) -> None:
    client = await start_app(make_config({"a": fake_model()}))
    path = write_config(tmp_path / "models.yaml", {"b": fake_model()})
    result = await reload_from_file(runtime_of(client), path)
    assert result is not None
    assert (result.added, result.removed) == (("b",), ("a",))
    assert await model_ids(client) == ["b"]


async def test_a_bad_file_is_refused_and_the_old_config_keeps_serving(
    start_app: AppFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = await start_app(make_config({"a": fake_model()}))
    runtime = runtime_of(client)
    before = runtime.config
    path = write_config(tmp_path / "models.yaml", {"a": fake_model(), "b": fake_model(ttl="soon", colour=1)})
    with caplog.at_level(logging.ERROR):
        assert await reload_from_file(runtime, path) is None
    assert "reload refused" in caplog.text
    assert "models.b.ttl" in caplog.text  # every problem, by its YAML path
    assert "models.b.colour: unknown key" in caplog.text
    assert runtime.config is before
    assert await model_ids(client) == ["a"]
    assert (await chat(client, "a"))[0] == 200

    caplog.clear()
    (tmp_path / "broken.yaml").write_text("models: [unclosed\n")
    with caplog.at_level(logging.ERROR):
        assert await reload_from_file(runtime, tmp_path / "broken.yaml") is None
    assert "invalid YAML" in caplog.text
    with caplog.at_level(logging.ERROR):
        assert await reload_from_file(runtime, tmp_path / "missing.yaml") is None
    assert "no such file" in caplog.text
    assert await model_ids(client) == ["a"]


async def test_a_reload_that_changes_max_audio_size_takes_effect_and_says_so(start_app: AppFactory) -> None:
    stt = {"task": "speech-to-text", "engine": "fake"}
    client = await start_app(make_config({"stt": stt}, max_audio_size=10_000))

    async def upload(size: int) -> int:
        form = FormData()
        form.add_field("model", "stt")
        form.add_field("file", b"\0" * size, filename="a.wav", content_type="audio/wav")
        return (await client.post("/v1/audio/transcriptions", data=form)).status

    assert await upload(8_000) == 200
    result = await runtime_of(client).reload(make_config({"stt": stt}, max_audio_size=5_000))
    assert result.settings_changed == ("max_audio_size",)
    assert "max_audio_size changed" in result.summary()
    assert "no model changed" in result.summary()
    assert await upload(8_000) == 413
    assert await upload(5_000) == 200
