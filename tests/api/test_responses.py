"""The Responses API end to end on the FakeEngine: the official SDK's client.responses, raw HTTP and SSE,
the SQLite store across an app restart, and what is refused."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient
from pydantic import BaseModel

from lllmsd.api.keys import RUNTIME
from lllmsd.config import DaemonConfig
from lllmsd.core.jobs import Feature
from lllmsd.engines.fake import FakeEngine
from tests.api.probe import Probe, eventually
from tests.conftest import AppFactory, fake_model, make_config, sdk

PREFIXES = ["/v1", "/openai/v1"]
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}


class JsonFakeEngine(FakeEngine):
    """The FakeEngine declaring JSON output. It still only echoes the last user message, so a test that
    sends a JSON document checks the plumbing of text.format (the request reaches the engine as a
    response_format, the answer parses), not that output is constrained: tests/engines does that."""

    features = FakeEngine.features | {Feature.JSON_OUTPUT}
    seen_formats: list[Any] = []  # noqa: RUF012 - what each chat job asked for, for the test to read

    def chat(self, job, cancel):  # type: ignore[no-untyped-def]
        self.seen_formats.append(job.response_format)
        return super().chat(job, cancel)


def responses_config(tmp_path: Path, models: dict[str, Any] | None = None, **responses: Any) -> DaemonConfig:
    return make_config(
        models or {"chat": fake_model()},
        cache_dir=str(tmp_path / "cache"),
        responses={"path": str(tmp_path / "responses.sqlite3"), **responses},
    )


@pytest.fixture
async def daemon(start_app: AppFactory, tmp_path: Path) -> TestClient:
    return await start_app(responses_config(tmp_path))


def stored_ids(tmp_path: Path) -> list[str]:
    """The ids in the database file, oldest first (none when the daemon never opened it)."""
    if not (tmp_path / "responses.sqlite3").exists():
        return []
    with contextlib.closing(sqlite3.connect(tmp_path / "responses.sqlite3")) as db:
        return [row[0] for row in db.execute("SELECT id FROM responses ORDER BY created_at")]


def assert_error(body: dict[str, Any], param: str | None, code: str | None = None) -> dict[str, Any]:
    assert set(body) == {"error"}
    error = body["error"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    assert error["message"]
    return error


# --------------------------------------------------------------------------------- create and store


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_create_retrieve_input_items_delete_through_the_sdk(
    daemon: TestClient, prefix: str, tmp_path: Path
) -> None:
    async with sdk(daemon, prefix) as api:
        response = await api.responses.create(
            model="chat", instructions="Be brief.", input="the quick brown fox", metadata={"k": "v"}, temperature=0.5
        )
        assert response.id.startswith("resp_")
        assert response.object == "response"
        assert response.status == "completed"
        assert response.model == "chat"
        assert response.output_text == "the quick brown fox"
        assert response.instructions == "Be brief."
        assert response.metadata == {"k": "v"}
        assert response.temperature == 0.5
        assert response.store is True
        message = response.output[0]
        assert message.type == "message"
        assert message.role == "assistant"
        assert message.id.startswith("msg_")
        assert response.usage is not None
        # <system> Be brief. <user> the quick brown fox <assistant>
        assert (response.usage.input_tokens, response.usage.output_tokens) == (9, 4)
        assert response.usage.total_tokens == 13
        assert response.usage.input_tokens_details.cached_tokens == 0

        again = await api.responses.retrieve(response.id)
        assert again.model_dump() == response.model_dump()

        items = [item async for item in api.responses.input_items.list(response.id)]
        assert len(items) == 1
        assert items[0].type == "message"
        assert items[0].role == "user"
        assert items[0].content[0].text == "the quick brown fox"
        assert items[0].id.startswith("msg_")

        assert stored_ids(tmp_path) == [response.id]
        await api.responses.delete(response.id)
        assert stored_ids(tmp_path) == []
        with pytest.raises(openai.NotFoundError) as missing:
            await api.responses.retrieve(response.id)
        assert missing.value.body["param"] == "response_id"  # type: ignore[index]
        with pytest.raises(openai.NotFoundError):
            await api.responses.delete(response.id)
        with pytest.raises(openai.NotFoundError):
            await api.responses.input_items.list(response.id)


async def test_input_items_are_paginated_like_openai(daemon: TestClient) -> None:
    words = [f"w{i}" for i in range(5)]
    async with sdk(daemon) as api:
        response = await api.responses.create(model="chat", input=[{"role": "user", "content": word} for word in words])
        newest_first = await api.responses.input_items.list(response.id, limit=2)
        assert [i.content[0].text for i in newest_first.data] == ["w4", "w3"]  # type: ignore[union-attr]
        assert newest_first.has_more is True
        every = [
            item.content[0].text async for item in api.responses.input_items.list(response.id, limit=2, order="asc")
        ]  # type: ignore[union-attr]
        assert every == words
    raw = await daemon.get(f"/v1/responses/{response.id}/input_items", params={"limit": "2", "order": "asc"})
    page = await raw.json()
    assert page["object"] == "list"
    assert page["first_id"] == page["data"][0]["id"]
    assert page["last_id"] == page["data"][1]["id"]
    after = await daemon.get(
        f"/v1/responses/{response.id}/input_items", params={"after": page["last_id"], "order": "asc"}
    )
    assert [i["content"][0]["text"] for i in (await after.json())["data"]] == words[2:]
    for params, param in (({"limit": "0"}, "limit"), ({"order": "up"}, "order"), ({"after": "nope"}, "after")):
        bad = await daemon.get(f"/v1/responses/{response.id}/input_items", params=params)
        assert bad.status == 400
        assert_error(await bad.json(), param)


async def test_store_false_leaves_no_row_and_cannot_be_retrieved_or_chained(daemon: TestClient, tmp_path: Path) -> None:
    async with sdk(daemon) as api:
        response = await api.responses.create(model="chat", input="not kept", store=False)
        assert response.store is False
        assert response.output_text == "not kept"
        with pytest.raises(openai.NotFoundError):
            await api.responses.retrieve(response.id)
        with pytest.raises(openai.NotFoundError) as chained:
            await api.responses.create(model="chat", input="next", previous_response_id=response.id)
    assert chained.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert chained.value.body["code"] == "response_not_found"  # type: ignore[index]
    assert stored_ids(tmp_path) == []


async def test_the_store_default_comes_from_the_config(start_app: AppFactory, tmp_path: Path) -> None:
    client = await start_app(responses_config(tmp_path, store=False))
    async with sdk(client) as api:
        default = await api.responses.create(model="chat", input="one")
        asked = await api.responses.create(model="chat", input="two", store=True)
    assert (default.store, asked.store) == (False, True)
    assert stored_ids(tmp_path) == [asked.id]


async def test_max_output_tokens_gives_incomplete(daemon: TestClient) -> None:
    async with sdk(daemon) as api:
        response = await api.responses.create(model="chat", input="one two three four", max_output_tokens=2)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "one two"
    assert response.output[0].status == "incomplete"  # type: ignore[union-attr]
    assert response.max_output_tokens == 2


async def test_parse_with_a_pydantic_text_format(start_app: AppFactory, tmp_path: Path) -> None:
    class City(BaseModel):
        name: str
        population: int

    JsonFakeEngine.seen_formats = []
    client = await start_app(responses_config(tmp_path), engines={"fake": JsonFakeEngine})
    async with sdk(client) as api:
        parsed = await api.responses.parse(
            model="chat", input='{"name": "Oslo", "population": 709000}', text_format=City
        )
    assert parsed.output_parsed == City(name="Oslo", population=709000)
    fmt = JsonFakeEngine.seen_formats[-1]
    assert (fmt.type, fmt.name, fmt.strict) == ("json_schema", "City", True)
    assert fmt.schema["required"] == ["name", "population"]
    assert parsed.text is not None
    assert parsed.text.format is not None
    assert parsed.text.format.type == "json_schema"


async def test_json_output_on_an_engine_without_it_is_refused_naming_text_format(daemon: TestClient) -> None:
    raw = await daemon.post(
        "/v1/responses", json={"model": "chat", "input": "x", "text": {"format": {"type": "json_object"}}}
    )
    assert raw.status == 400
    error = assert_error(await raw.json(), "text.format", "unsupported_parameter")
    assert "'text.format'" in error["message"]


# ------------------------------------------------------------------------------------------ chains


async def test_a_chain_prepends_history_and_hits_the_cache(daemon: TestClient) -> None:
    async with sdk(daemon) as api:
        first = await api.responses.create(model="chat", instructions="Be brief.", input="alpha beta")
        second = await api.responses.create(
            model="chat", instructions="Be brief.", input="gamma", previous_response_id=first.id
        )
        third = await api.responses.create(
            model="chat", instructions="Be brief.", input="delta", previous_response_id=second.id
        )
    assert second.output_text == "gamma"
    assert second.previous_response_id == first.id
    assert first.usage is not None
    assert second.usage is not None
    assert third.usage is not None
    # the whole previous turn (its prompt and its answer) is in the instance's cache
    assert second.usage.input_tokens_details.cached_tokens == first.usage.input_tokens + first.usage.output_tokens
    assert third.usage.input_tokens_details.cached_tokens == second.usage.input_tokens + second.usage.output_tokens
    # <system> Be brief. <user> alpha beta <assistant> alpha beta <user> gamma <assistant>
    assert second.usage.input_tokens == 12


async def test_unknown_previous_response_is_a_404_naming_it(daemon: TestClient) -> None:
    raw = await daemon.post("/v1/responses", json={"model": "chat", "input": "x", "previous_response_id": "resp_nope"})
    assert raw.status == 404
    assert_error(await raw.json(), "previous_response_id", "response_not_found")


async def test_state_survives_a_restart_on_the_same_database(start_app: AppFactory, tmp_path: Path) -> None:
    first_app = await start_app(responses_config(tmp_path))
    async with sdk(first_app) as api:
        first = await api.responses.create(model="chat", input="alpha beta")
        gone = await api.responses.create(model="chat", input="to delete")
        await api.responses.delete(gone.id)
    await first_app.close()  # the daemon stops; a new one starts on the same file

    second_app = await start_app(responses_config(tmp_path))
    async with sdk(second_app) as api:
        again = await api.responses.retrieve(first.id)
        assert again.output_text == "alpha beta"
        items = [i async for i in api.responses.input_items.list(first.id)]
        assert items[0].content[0].text == "alpha beta"  # type: ignore[union-attr]
        with pytest.raises(openai.NotFoundError):
            await api.responses.retrieve(gone.id)
        chained = await api.responses.create(model="chat", input="gamma", previous_response_id=first.id)
    assert chained.output_text == "gamma"
    assert chained.usage is not None
    # a new instance: the history is evaluated once, all of it
    assert chained.usage.input_tokens == 9  # <user> alpha beta <assistant> alpha beta <user> gamma <assistant>
    assert chained.usage.input_tokens_details.cached_tokens == 0


async def test_concurrent_chains_on_one_id_both_answer_and_are_stored(start_app: AppFactory, tmp_path: Path) -> None:
    client = await start_app(responses_config(tmp_path, models={"chat": fake_model(max_instances=2, token_delay=0.01)}))
    async with sdk(client) as api:
        root = await api.responses.create(model="chat", input="root")
        left, right = await asyncio.gather(
            api.responses.create(model="chat", input="left", previous_response_id=root.id),
            api.responses.create(model="chat", input="right", previous_response_id=root.id),
        )
        assert (left.output_text, right.output_text) == ("left", "right")
        for branch in (left, right):
            assert (await api.responses.retrieve(branch.id)).previous_response_id == root.id
    assert sorted(stored_ids(tmp_path)) == sorted([root.id, left.id, right.id])


async def test_retention_by_count_never_breaks_a_chain_in_use(start_app: AppFactory, tmp_path: Path) -> None:
    client = await start_app(responses_config(tmp_path, max_count=1))
    async with sdk(client) as api:
        first = await api.responses.create(model="chat", input="alpha")
        second = await api.responses.create(model="chat", input="beta", previous_response_id=first.id)
        # storing the second swept the first away; the chain goes on from the second
        assert stored_ids(tmp_path) == [second.id]
        with pytest.raises(openai.NotFoundError):
            await api.responses.retrieve(first.id)
        third = await api.responses.create(model="chat", input="gamma", previous_response_id=second.id)
    assert third.usage is not None
    # <user> alpha <assistant> alpha <user> beta <assistant> beta <user> gamma <assistant>: all three turns
    assert third.usage.input_tokens == 11


async def test_a_function_call_round_trip(daemon: TestClient) -> None:
    async with sdk(daemon) as api:
        call_turn = await api.responses.create(
            model="chat", input="use get_weather for Paris", tools=[WEATHER_TOOL], tool_choice="required"
        )
        call = call_turn.output[0]
        assert call.type == "function_call"
        assert call.name == "get_weather"
        assert call.call_id.startswith("call_")
        assert call.id is not None
        assert call.id.startswith("fc_")
        assert json.loads(call.arguments) == {"text": "use get_weather for Paris"}
        assert call.arguments == json.dumps(json.loads(call.arguments), separators=(",", ":"))
        assert call_turn.tools[0].name == "get_weather"  # type: ignore[union-attr]
        assert call_turn.tool_choice == "required"

        answer = await api.responses.create(
            model="chat",
            previous_response_id=call_turn.id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny and warm"}],
            tools=[WEATHER_TOOL],
            tool_choice="none",
        )
        assert answer.status == "completed"
        assert answer.output[0].type == "message"
        assert answer.output_text == "use get_weather for Paris"  # the FakeEngine repeats the last user message
        items = [i async for i in api.responses.input_items.list(answer.id)]
        assert items[0].type == "function_call_output"
        assert items[0].call_id == call.call_id  # type: ignore[union-attr]
    assert answer.usage is not None
    # <user> + 4 words, <assistant> <call:get_weather> + the arguments' 4 words, <tool> sunny and warm, <assistant>
    assert answer.usage.input_tokens == 5 + 1 + 5 + 4 + 1


async def test_earlier_output_items_sent_back_as_they_came(daemon: TestClient) -> None:
    """A stateless client (store: false) re-sends the output items it got: they are read back."""
    async with sdk(daemon) as api:
        first = await api.responses.create(model="chat", input="alpha beta", store=False)
        history = [
            {"role": "user", "content": "alpha beta"},
            *[item.model_dump(exclude_none=True) for item in first.output],
        ]
        second = await api.responses.create(
            model="chat", input=[*history, {"role": "user", "content": "gamma"}], store=False
        )
    assert second.output_text == "gamma"
    assert second.usage is not None
    assert second.usage.input_tokens_details.cached_tokens == 6  # <user> alpha beta <assistant> alpha beta


# ---------------------------------------------------------------------------------------- streaming


async def read_sse(response: Any) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of every event of a typed SSE stream, checking each has both lines."""
    events: list[tuple[str, dict[str, Any]]] = []
    name: str | None = None
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            assert name is not None, f"data without an event line: {line}"
            events.append((name, json.loads(line[6:])))
            name = None
    return events


async def test_raw_sse_events_are_typed_numbered_and_in_order(daemon: TestClient, tmp_path: Path) -> None:
    raw = await daemon.post("/v1/responses", json={"model": "chat", "input": "one two three", "stream": True})
    assert raw.status == 200
    assert raw.headers["Content-Type"].startswith("text/event-stream")
    events = await read_sse(raw)
    assert all(name == data["type"] for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    names = [name for name, _ in events]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    data = [d for _, d in events]
    assert data[0]["response"]["status"] == "in_progress"
    assert "".join(d["delta"] for d in data if d["type"] == "response.output_text.delta") == "one two three"
    assert data[7]["text"] == "one two three"
    final = data[-1]["response"]
    assert final["status"] == "completed"
    assert final["output"][0]["content"][0]["text"] == "one two three"
    assert final["usage"]["output_tokens"] == 3
    assert stored_ids(tmp_path) == [final["id"]]


async def test_raw_sse_of_a_function_call(daemon: TestClient) -> None:
    body = {"model": "chat", "input": "weather?", "stream": True, "tools": [WEATHER_TOOL], "tool_choice": "required"}
    events = await read_sse(await daemon.post("/v1/responses", json=body))
    names = [name for name, _ in events]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    added, done = events[2][1], events[6][1]
    assert added["item"]["arguments"] == ""
    assert added["item"]["name"] == "get_weather"
    deltas = "".join(d["delta"] for n, d in events if n == "response.function_call_arguments.delta")
    assert json.loads(events[5][1]["arguments"]) == json.loads(deltas) == {"text": "weather?"}
    assert done["item"]["status"] == "completed"


async def test_the_sdk_stream_helper_gives_the_final_response(daemon: TestClient) -> None:
    async with sdk(daemon) as api:
        async with api.responses.stream(model="chat", input="streamed words here") as stream:
            deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
            final = await stream.get_final_response()
        again = await api.responses.retrieve(final.id)
    assert "".join(deltas) == "streamed words here"
    assert final.output_text == "streamed words here"
    assert again.output_text == "streamed words here"


async def test_a_client_that_leaves_mid_stream_stops_the_engine_within_one_token(
    start_app: AppFactory, tmp_path: Path
) -> None:
    probe = Probe()
    config = responses_config(tmp_path, models={"chat": fake_model(token_delay=0.01)})
    client = await start_app(config, engines={"fake": probe.engine_class()})
    long_text = " ".join(f"w{i}" for i in range(2000))
    response = await client.post("/v1/responses", json={"model": "chat", "input": long_text, "stream": True})
    for _ in range(12):  # into the text deltas
        await response.content.readline()
    response.close()
    runtime = client.app[RUNTIME]
    await eventually(lambda: probe.active == 0 and [i.state.value for i in runtime.pools["chat"].instances] == ["idle"])
    assert probe.events_after_cancel <= 1
    assert runtime.pools["chat"].instances[0].cached_tokens < 100  # it stopped long before the 2000 words
    assert stored_ids(tmp_path) == []  # a response nobody saw completed is not stored


async def test_max_output_tokens_streamed_ends_with_response_incomplete(daemon: TestClient) -> None:
    body = {"model": "chat", "input": "one two three", "stream": True, "max_output_tokens": 1}
    events = await read_sse(await daemon.post("/v1/responses", json=body))
    name, data = events[-1]
    assert name == "response.incomplete"
    assert data["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


async def test_a_failure_mid_stream_is_an_error_event_then_response_failed(
    start_app: AppFactory, tmp_path: Path
) -> None:
    client = await start_app(responses_config(tmp_path, models={"chat": fake_model(fail_after_tokens=2)}))
    events = await read_sse(
        await client.post("/v1/responses", json={"model": "chat", "input": "a b c d", "stream": True})
    )
    names = [name for name, _ in events]
    assert names[-2:] == ["error", "response.failed"]
    assert names.count("response.output_text.delta") == 2
    failed = events[-1][1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"]["message"]
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    assert stored_ids(tmp_path) == []
    # the daemon goes on serving
    after = await client.post("/v1/responses", json={"model": "chat", "input": "x"})
    assert after.status == 200


async def test_an_error_before_the_first_event_is_an_http_status(start_app: AppFactory, tmp_path: Path) -> None:
    client = await start_app(responses_config(tmp_path, models={"chat": fake_model(context_size=16)}))
    body = {"model": "chat", "input": " ".join(["word"] * 40), "stream": True}
    raw = await client.post("/v1/responses", json=body)
    assert raw.status == 400
    assert_error(await raw.json(), "input", "context_length_exceeded")


async def test_truncation_auto_drops_the_oldest_items_until_it_fits(
    start_app: AppFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "lllmsd.api.responses")
    client = await start_app(responses_config(tmp_path, models={"chat": fake_model(context_size=20)}))
    async with sdk(client) as api:
        first = await api.responses.create(model="chat", input="a b c d e f g h")  # 10 + 8 tokens
        with pytest.raises(openai.BadRequestError) as refused:
            await api.responses.create(model="chat", input="i j", previous_response_id=first.id)
        assert refused.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
        fitted = await api.responses.create(model="chat", input="i j", previous_response_id=first.id, truncation="auto")
    assert fitted.output_text == "i j"
    assert fitted.truncation == "auto"
    assert fitted.usage is not None
    # the first user message went: <assistant> a ... h <user> i j <assistant>
    assert fitted.usage.input_tokens == 13
    assert "leaves out the 1 oldest messages" in caplog.text


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"background": True}, "background"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [WEATHER_TOOL, {"type": "file_search", "vector_store_ids": ["vs"]}]}, "tools[1].type"),
        ({"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "tools[0].type"),
        ({"tools": [{"type": "mcp", "server_label": "x"}]}, "tools[0].type"),
        ({"tools": [{"type": "image_generation"}]}, "tools[0].type"),
        ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"max_tool_calls": 3}, "max_tool_calls"),
        ({"context_management": [{"type": "compaction"}]}, "context_management"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]},
            "input[0].content[0]",
        ),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0]"),
        ({"input": [{"type": "web_search_call", "id": "ws", "status": "completed"}]}, "input[0].type"),
        ({"include": ["file_search_call.results"]}, "include"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"frobnicate": 1}, "frobnicate"),
    ],
)
async def test_what_lllmsd_does_not_offer_is_a_400_naming_it(
    daemon: TestClient, extra: dict[str, Any], param: str
) -> None:
    raw = await daemon.post("/v1/responses", json={"model": "chat", "input": "hi", **extra})
    assert raw.status == 400
    error = assert_error(await raw.json(), param)
    if error["code"] == "unsupported_parameter":
        assert "lllmsd" in error["message"]


async def test_streaming_a_stored_response_is_refused_naming_stream(daemon: TestClient) -> None:
    created = await (await daemon.post("/v1/responses", json={"model": "chat", "input": "hi"})).json()
    raw = await daemon.get(f"/v1/responses/{created['id']}", params={"stream": "true"})
    assert raw.status == 400
    assert_error(await raw.json(), "stream", "unsupported_parameter")


async def test_refusals_reach_the_sdk_as_bad_requests(daemon: TestClient) -> None:
    async with sdk(daemon) as api:
        with pytest.raises(openai.BadRequestError) as refused:
            await api.responses.create(model="chat", input="hi", background=True)
    assert refused.value.body["param"] == "background"  # type: ignore[index]
    assert "not offered" in refused.value.body["message"]  # type: ignore[index]


async def test_unknown_model_is_a_404(daemon: TestClient) -> None:
    raw = await daemon.post("/v1/responses", json={"model": "nope", "input": "hi"})
    assert raw.status == 404
    assert_error(await raw.json(), "model", "model_not_found")


# ---------------------------------------------------------------------------------- a broken store


async def test_a_corrupt_database_fails_only_the_requests_that_store(start_app: AppFactory, tmp_path: Path) -> None:
    (tmp_path / "responses.sqlite3").write_bytes(b"this is not a database" * 100)
    client = await start_app(responses_config(tmp_path))
    raw = await client.post("/v1/responses", json={"model": "chat", "input": "hi"})
    assert raw.status == 503
    error = assert_error(await raw.json(), None, "response_store_unavailable")
    assert "corrupt" in error["message"]
    # everything that does not need the store is served
    unstored = await client.post("/v1/responses", json={"model": "chat", "input": "hi", "store": False})
    assert unstored.status == 200
    chat = await client.post(
        "/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "x"}]}
    )
    assert chat.status == 200
    # once the file is moved away, the next request starts a new database
    (tmp_path / "responses.sqlite3").rename(tmp_path / "corrupt.sqlite3")
    stored = await client.post("/v1/responses", json={"model": "chat", "input": "hi"})
    assert stored.status == 200
    assert (await client.get(f"/v1/responses/{(await stored.json())['id']}")).status == 200


async def test_a_locked_database_is_a_clear_error_to_the_one_request(
    start_app: AppFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lllmsd.core.response_store.BUSY_TIMEOUT_SECONDS", 0.05)
    client = await start_app(responses_config(tmp_path))
    ok = await client.post("/v1/responses", json={"model": "chat", "input": "before"})
    assert ok.status == 200
    holder = sqlite3.connect(tmp_path / "responses.sqlite3", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
    try:
        locked = await client.post("/v1/responses", json={"model": "chat", "input": "during"})
        assert locked.status == 503
        assert "locked" in assert_error(await locked.json(), None, "response_store_unavailable")["message"]
        health = await client.get("/health")
        assert health.status == 200
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    after = await client.post("/v1/responses", json={"model": "chat", "input": "after"})
    assert after.status == 200
    assert (await client.get(f"/v1/responses/{(await ok.json())['id']}")).status == 200


# ------------------------------------------------------------------------------------ /openapi.json


async def test_bodies_and_events_conform_to_the_documented_models(daemon: TestClient) -> None:
    from lllmsd.api.schemas import bodies

    created = await (await daemon.post("/v1/responses", json={"model": "chat", "input": "hi there"})).json()
    bodies.ResponseObject.model_validate(created)
    call_body = {"model": "chat", "input": "x", "tools": [WEATHER_TOOL], "tool_choice": "required"}
    bodies.ResponseObject.model_validate(await (await daemon.post("/v1/responses", json=call_body)).json())
    bodies.ResponseObject.model_validate(await (await daemon.get(f"/v1/responses/{created['id']}")).json())
    items = await (await daemon.get(f"/v1/responses/{created['id']}/input_items")).json()
    bodies.ResponseInputItemList.model_validate(items)
    events = await read_sse(await daemon.post("/v1/responses", json={"model": "chat", "input": "a b", "stream": True}))
    for _, data in events:
        bodies.ResponseStreamEvent.model_validate(data)
    bodies.ResponseObject.model_validate(events[-1][1]["response"])
    deleted = await (await daemon.delete(f"/v1/responses/{created['id']}")).json()
    bodies.ResponseDeleted.model_validate(deleted)


async def test_reasoning_effort_is_refused_by_an_engine_without_a_chat_template(daemon: TestClient) -> None:
    body = {"model": "chat", "input": "hi", "reasoning": {"effort": "low"}}
    response = await daemon.post("/v1/responses", json=body)
    assert response.status == 400
    error = (await response.json())["error"]
    assert (error["param"], error["code"]) == ("reasoning.effort", "unsupported_parameter")
