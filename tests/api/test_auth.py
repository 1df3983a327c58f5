"""Bearer-token authentication: missing, wrong and right keys; /health open; keys from the environment."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient

from lllmsd.api.auth import bearer_token, key_matches
from lllmsd.config import ConfigError, load_config
from tests.conftest import AppFactory, fake_model, make_config, sdk

KEYS = ["sk-first-0123456789", "sk-second-abcdef"]
USER = [{"role": "user", "content": "hello there"}]
CHAT = {"model": "chat", "messages": USER}


@pytest.fixture
async def locked(start_app: AppFactory) -> TestClient:
    return await start_app(make_config(api_keys=KEYS))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def assert_401(response: Any) -> dict[str, Any]:
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.headers["X-Request-Id"]
    body = await response.json()
    assert set(body) == {"error"}
    assert body["error"]["type"] == "authentication_error"
    assert body["error"]["code"] == "invalid_api_key"
    return body["error"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models"),
        ("GET", "/openai/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/"),
        ("GET", "/metrics"),
        ("GET", "/no/such/route"),
    ],
)
async def test_a_missing_key_is_401_everywhere_but_health(locked: TestClient, method: str, path: str) -> None:
    error = await assert_401(await locked.request(method, path, json=CHAT))
    assert "API key" in error["message"]


@pytest.mark.parametrize(
    "header",
    [
        "Bearer sk-wrong",
        f"Bearer {KEYS[0]}x",
        f"Bearer {KEYS[0][:-1]}",
        f"Basic {KEYS[0]}",
        KEYS[0],
        "Bearer ",
        f"Bearer{KEYS[0]}",
    ],
)
async def test_a_wrong_key_is_401(locked: TestClient, header: str) -> None:
    error = await assert_401(await locked.post("/v1/chat/completions", json=CHAT, headers={"Authorization": header}))
    assert error["message"]


@pytest.mark.parametrize("key", KEYS)
async def test_either_configured_key_is_accepted(locked: TestClient, key: str) -> None:
    response = await locked.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
    assert response.status == 200
    assert (await response.json())["choices"][0]["message"]["content"] == "hello there"
    assert (await locked.get("/", headers=bearer(key))).status == 200
    assert (await locked.get("/metrics", headers=bearer(key))).status == 200


async def test_the_scheme_is_case_insensitive(locked: TestClient) -> None:
    response = await locked.get("/v1/models", headers={"Authorization": f"bearer {KEYS[1]}"})
    assert response.status == 200


async def test_health_stays_open(locked: TestClient) -> None:
    response = await locked.get("/health")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_the_sdk_with_right_and_wrong_keys(locked: TestClient) -> None:
    async with sdk(locked, api_key=KEYS[1]) as api:
        answer = await api.chat.completions.create(model="chat", messages=USER)  # type: ignore[arg-type]
    assert answer.choices[0].message.content == "hello there"
    async with sdk(locked, api_key="sk-not-a-key") as api:
        with pytest.raises(openai.AuthenticationError) as caught:
            await api.models.list()
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"


async def test_without_keys_everything_is_open(client: TestClient) -> None:
    assert (await client.get("/v1/models")).status == 200
    assert (await client.get("/")).status == 200
    assert (await client.get("/v1/models", headers=bearer("anything"))).status == 200


async def test_keys_never_reach_the_logs(locked: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await locked.get("/v1/models", headers=bearer(KEYS[0]))
    await locked.get("/v1/models", headers=bearer("sk-guessed-key-42"))
    assert "/v1/models" in caplog.text  # the access log did run
    assert KEYS[0] not in caplog.text
    assert "sk-guessed-key-42" not in caplog.text


def test_keys_from_the_environment_are_added_to_the_file_ones(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("api_keys: [from-file]\nmodels: {chat: {task: text-completion, engine: fake}}\n")
    config = load_config(path, environ={"LLLMSD_API_KEYS": " env-one , env-two,,"})
    assert [k.get_secret_value() for k in config.api_keys] == ["from-file", "env-one", "env-two"]
    assert [k.get_secret_value() for k in load_config(path, environ={}).api_keys] == ["from-file"]
    assert "env-one" not in repr(config)  # SecretStr: never printed by accident


async def test_an_environment_key_opens_the_api(tmp_path: Path, start_app: AppFactory) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("models: {chat: {task: text-completion, engine: fake}}\n")
    client = await start_app(load_config(path, environ={"LLLMSD_API_KEYS": "sk-env"}))
    assert (await client.get("/v1/models")).status == 401
    assert (await client.get("/v1/models", headers=bearer("sk-env"))).status == 200


def test_an_empty_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        make_config({"chat": fake_model()}, api_keys=["ok-key", "  "])
    assert caught.value.problems == [("api_keys.1", "an API key cannot be empty")]


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("  bearer   abc  ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer") is None
    assert bearer_token("") is None


def test_key_matches_compares_whole_keys() -> None:
    import hashlib

    digests = [hashlib.sha256(k.encode()).digest() for k in KEYS]
    assert key_matches(KEYS[0], digests)
    assert key_matches(KEYS[1], digests)
    assert not key_matches(KEYS[0][:-1], digests)
    assert not key_matches(KEYS[0] + KEYS[1], digests)
    assert not key_matches("", digests)
    assert not key_matches(KEYS[0], [])
