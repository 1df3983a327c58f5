"""The session header: echoed on every response of its request, refused when malformed, renamed by the
config, and used by the pool to send a session's turn back to the instance that served it last."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from lllmsd.api.keys import RUNTIME
from tests.api.probe import eventually
from tests.conftest import AppFactory, fake_model, make_config, sse_data

HELLO = [{"role": "user", "content": "the quick brown fox"}]


async def chat(client: TestClient, messages: list[dict[str, Any]], session: str | None = None, **extra: Any) -> Any:
    headers = {"X-Session-Id": session} if session is not None else {}
    response = await client.post(
        "/v1/chat/completions", json={"model": "chat", "messages": messages, **extra}, headers=headers
    )
    assert response.status == 200, await response.text()
    return await response.json()


def served_by(body: dict[str, Any]) -> str:
    """The instance that answered: its id is part of the response id (chatcmpl-<instance>-<random>)."""
    match = re.fullmatch(r"chatcmpl-(chat-\d+)-[0-9a-f]+", body["id"])
    assert match, body["id"]
    return match.group(1)


async def test_the_session_id_comes_back_on_answers_streams_and_errors(client: TestClient) -> None:
    headers = {"X-Session-Id": "conv-42"}
    answer = await client.post("/v1/chat/completions", json={"model": "chat", "messages": HELLO}, headers=headers)
    assert answer.status == 200
    assert answer.headers["X-Session-Id"] == "conv-42"

    stream = await client.post(
        "/v1/chat/completions", json={"model": "chat", "messages": HELLO, "stream": True}, headers=headers
    )
    assert stream.headers["X-Session-Id"] == "conv-42"  # set before the stream's headers went out
    assert len(await sse_data(stream)) > 2

    missing = await client.post("/v1/chat/completions", json={"model": "nope", "messages": HELLO}, headers=headers)
    assert missing.status == 404
    assert missing.headers["X-Session-Id"] == "conv-42"

    plain = await client.post("/v1/chat/completions", json={"model": "chat", "messages": HELLO})
    assert "X-Session-Id" not in plain.headers


async def test_a_malformed_session_id_is_a_400_naming_the_header(client: TestClient) -> None:
    for bad in ("x" * 257, "two words"):
        response = await client.post(
            "/v1/chat/completions", json={"model": "chat", "messages": HELLO}, headers={"X-Session-Id": bad}
        )
        assert response.status == 400
        error = (await response.json())["error"]
        assert error["param"] == "X-Session-Id"
        assert error["code"] == "invalid_value"
        assert "X-Session-Id" not in response.headers


async def test_the_header_name_comes_from_the_config(start_app: AppFactory) -> None:
    client = await start_app(make_config(session_header="X-Conversation"))
    response = await client.post(
        "/v1/chat/completions",
        json={"model": "chat", "messages": HELLO},
        headers={"X-Conversation": "c-1", "X-Session-Id": "ignored"},
    )
    assert response.status == 200
    assert response.headers["X-Conversation"] == "c-1"
    assert "X-Session-Id" not in response.headers


async def test_a_session_returns_to_its_instance_when_its_history_was_edited(start_app: AppFactory) -> None:
    client = await start_app(make_config({"chat": fake_model(max_instances=2)}))
    alpha = [{"role": "user", "content": "alpha one two three"}]
    beta = [{"role": "user", "content": "beta four five six"}]

    first = await chat(client, alpha, "alpha")
    assert served_by(first) == "chat-1"
    assert served_by(await chat(client, beta, "beta")) == "chat-2"  # no common prefix: a new instance
    # alpha's next turn: a common prefix and its session agree; chat-1 is now the most recently used
    follow_up = [*alpha, first["choices"][0]["message"], {"role": "user", "content": "seven"}]
    assert served_by(await chat(client, follow_up, "alpha")) == "chat-1"

    # the client cut the first message short: no instance shares a prefix with the history any more
    edited = [{"role": "user", "content": "alpha one"}, *follow_up[1:]]
    assert served_by(await chat(client, edited, "alpha")) == "chat-1"
    # without the session, the same history would have gone to the least recently used instance
    assert served_by(await chat(client, [{"role": "user", "content": "alpha"}, *follow_up[1:]])) == "chat-2"


async def test_a_session_does_not_pull_back_an_instance_that_has_served_another_since(start_app: AppFactory) -> None:
    client = await start_app(make_config({"chat": fake_model(max_instances=2)}))
    alpha = [{"role": "user", "content": "alpha one two three"}]
    assert served_by(await chat(client, alpha, "alpha")) == "chat-1"
    assert served_by(await chat(client, [{"role": "user", "content": "beta four"}], "beta")) == "chat-2"
    gamma = [{"role": "user", "content": "gamma five six"}]
    first = await chat(client, gamma, "gamma")
    assert served_by(first) == "chat-1"  # the least recently used instance: alpha's conversation is gone
    # alpha comes back with an edited history: chat-1 holds gamma now, so alpha is not sent there
    # (it would evict gamma for nothing); it takes the least recently used instance like any newcomer
    assert served_by(await chat(client, [{"role": "user", "content": "alpha one"}], "alpha")) == "chat-2"
    follow_up = [*gamma, first["choices"][0]["message"], {"role": "user", "content": "seven"}]
    again = await chat(client, follow_up, "gamma")
    assert served_by(again) == "chat-1"
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


async def test_openapi_documents_the_configured_session_header(start_app: AppFactory) -> None:
    client = await start_app(make_config(session_header="X-Conversation"))
    document = await (await client.get("/openapi.json")).json()
    for path in ("/v1/chat/completions", "/v1/completions", "/openai/v1/chat/completions"):
        (parameter,) = document["paths"][path]["post"]["parameters"]
        assert parameter["name"] == "X-Conversation"
        assert parameter["in"] == "header"
        assert parameter["required"] is False
    assert "parameters" not in document["paths"]["/v1/embeddings"]["post"]


async def test_a_shared_system_prompt_does_not_pull_a_new_session_onto_another_ones_instance(
    start_app: AppFactory,
) -> None:
    client = await start_app(make_config({"chat": fake_model(min_instances=2, max_instances=2)}))
    pool = client.server.app[RUNTIME].pools["chat"]
    await eventually(lambda: [i.state.value for i in pool.instances] == ["idle", "idle"])
    system = {"role": "system", "content": "you answer briefly"}
    first: dict[str, Any] = {}
    for session, instance in (("alpha", "chat-1"), ("beta", "chat-2")):
        first[session] = await chat(client, [system, {"role": "user", "content": f"{session} one two"}], session)
        # beta shares alpha's system prompt, a prefix of alpha's instance; it takes the fresh one instead
        assert served_by(first[session]) == instance
    for session, instance in (("alpha", "chat-1"), ("beta", "chat-2")):
        history = [system, {"role": "user", "content": f"{session} one two"}, first[session]["choices"][0]["message"]]
        again = await chat(client, [*history, {"role": "user", "content": "three"}], session)
        assert served_by(again) == instance
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


async def test_with_no_fresh_instance_a_new_session_evicts_the_oldest_conversation_not_a_prefix(
    start_app: AppFactory,
) -> None:
    client = await start_app(make_config({"chat": fake_model(max_instances=2)}))
    await chat(client, HELLO, "old-1")  # chat-1
    await chat(client, [{"role": "user", "content": "another old one"}], "old-2")  # chat-2, used last
    system = {"role": "system", "content": "you answer briefly"}
    first = await chat(client, [system, {"role": "user", "content": "new one"}], "new-1")
    assert served_by(first) == "chat-1"  # the least recently used conversation makes room
    # new-2 shares new-1's system prompt, a prefix of what chat-1 holds: it still takes the older chat-2
    assert served_by(await chat(client, [system, {"role": "user", "content": "new two"}], "new-2")) == "chat-2"
    history = [system, {"role": "user", "content": "new one"}, first["choices"][0]["message"]]
    again = await chat(client, [*history, {"role": "user", "content": "more"}], "new-1")
    assert served_by(again) == "chat-1"
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


async def test_the_responses_api_takes_the_session_too(start_app: AppFactory, tmp_path: Path) -> None:
    config = make_config({"chat": fake_model(max_instances=2)}, responses={"path": str(tmp_path / "r.sqlite3")})
    client = await start_app(config)
    body = {"model": "chat", "input": "the quick brown fox", "store": False}
    response = await client.post("/v1/responses", json=body, headers={"X-Session-Id": "resp-1"})
    assert response.status == 200, await response.text()
    assert response.headers["X-Session-Id"] == "resp-1"
    (instance,) = client.server.app[RUNTIME].pools["chat"].instances
    assert instance.session == "resp-1"  # the pool knows which conversation this instance holds
