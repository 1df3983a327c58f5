"""The instance pool, through the whole HTTP app on an instrumented FakeEngine, with an injected clock."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient

from lllmsd.api.keys import RUNTIME
from lllmsd.core.clock import ManualClock
from lllmsd.core.instance import ModelInstance
from lllmsd.core.runtime import Runtime
from tests.api.probe import Probe, eventually
from tests.conftest import AppFactory, fake_model, make_config, sdk


def runtime_of(client: TestClient) -> Runtime:
    return client.server.app[RUNTIME]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def chat(
    client: TestClient,
    messages: list[dict[str, Any]],
    model: str = "chat",
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Any:
    body = {"model": model, "messages": messages, **extra}
    response = await client.post("/v1/chat/completions", json=body, headers=headers)
    return response.status, await response.json(), response.headers


async def status(client: TestClient) -> dict[str, Any]:
    return await (await client.get("/")).json()


def states(client: TestClient, model: str = "chat") -> list[str]:
    return [i.state.value for i in runtime_of(client).pools[model].instances]


# -------------------------------------------------------------------------------------- min and max


async def test_min_instances_load_at_start_and_come_back_after_a_failure(start_app: AppFactory) -> None:
    probe = Probe()
    client = await start_app(
        make_config({"chat": fake_model(min_instances=2, max_instances=3)}), engines={"fake": probe.engine_class()}
    )
    await eventually(lambda: states(client) == ["idle", "idle"])
    first_ids = {i.id for i in runtime_of(client).pools["chat"].instances}

    code, body, _ = await chat(client, user("explode now"))
    assert code == 500
    assert body["error"]["code"] == "engine_error"
    await eventually(lambda: states(client) == ["idle", "idle"])
    ids = {i.id for i in runtime_of(client).pools["chat"].instances}
    assert len(ids - first_ids) == 1  # the failed one was replaced
    assert probe.created == 3


async def test_max_instances_hold_under_200_concurrent_requests(start_app: AppFactory) -> None:
    probe = Probe()
    config = make_config({"chat": fake_model(max_instances=4, max_waiting=256, token_delay=0.001)}, concurrency=8)
    client = await start_app(config, engines={"fake": probe.engine_class()})
    results = await asyncio.gather(*(chat(client, user(f"request {i}")) for i in range(200)))
    assert [code for code, _, _ in results] == [200] * 200
    assert all(body["choices"][0]["message"]["content"] == f"request {i}" for i, (_, body, _) in enumerate(results))
    assert probe.created == 4
    assert probe.peak == 4
    assert len(runtime_of(client).pools["chat"].instances) == 4


async def test_global_concurrency_caps_engine_calls_across_models(start_app: AppFactory) -> None:
    probe = Probe(gated=True)
    config = make_config({"a": fake_model(max_instances=2), "b": fake_model(max_instances=2)}, concurrency=1)
    client = await start_app(config, engines={"fake": probe.engine_class()})
    requests = [asyncio.ensure_future(chat(client, user(f"r{i}"), model="ab"[i % 2])) for i in range(4)]
    await eventually(lambda: probe.active == 1)
    await asyncio.sleep(0.05)  # give a wrongly admitted second call the chance to show up
    assert probe.active == 1
    probe.gate.set()
    assert [code for code, _, _ in await asyncio.gather(*requests)] == [200] * 4
    assert probe.peak == 1


async def test_a_loading_model_blocks_neither_status_nor_other_models(start_app: AppFactory) -> None:
    probe = Probe(load_gated=True)
    config = make_config({"slow": fake_model(load_delay=0.001), "fast": fake_model()})
    client = await start_app(config, engines={"fake": probe.engine_class()})
    waiting = asyncio.ensure_future(chat(client, user("patience"), model="slow"))
    await eventually(lambda: states(client, "slow") == ["loading"])
    model = (await status(client))["models"]["slow"]
    assert (model["state"], model["waiting"]) == ("loading", 1)
    code, body, _ = await chat(client, user("quick"), model="fast")
    assert code == 200
    assert body["choices"][0]["message"]["content"] == "quick"
    assert states(client, "slow") == ["loading"]
    probe.load_gate.set()
    code, body, _ = await waiting
    assert code == 200
    instance = (await status(client))["models"]["slow"]["instances"][0]
    assert instance["last_used"] >= instance["created"]


# ------------------------------------------------------------------------------------------ ttl


async def test_ttl_disposes_idle_instances_down_to_min(start_app: AppFactory) -> None:
    clock = ManualClock()
    probe = Probe(gated=True)
    config = make_config({"chat": fake_model(min_instances=1, max_instances=3, ttl=10)}, concurrency=3)
    client = await start_app(config, engines={"fake": probe.engine_class()}, clock=clock)
    requests = [asyncio.ensure_future(chat(client, user(f"r{i}"))) for i in range(3)]
    await eventually(lambda: probe.active == 3)
    probe.gate.set()
    await asyncio.gather(*requests)
    runtime = runtime_of(client)
    assert len(runtime.pools["chat"].instances) == 3

    clock.advance(9)
    runtime.reap()
    assert len(runtime.pools["chat"].instances) == 3
    clock.advance(2)
    runtime.reap()
    await eventually(lambda: probe.closed == 2)
    assert states(client) == ["idle"]
    clock.advance(1000)
    runtime.reap()
    assert states(client) == ["idle"]  # never below min_instances


async def test_ttl_zero_disposes_at_once_and_minus_one_never(start_app: AppFactory) -> None:
    clock = ManualClock()
    probe = Probe()
    config = make_config({"now": fake_model(ttl=0), "never": fake_model(ttl=-1)})
    client = await start_app(config, engines={"fake": probe.engine_class()}, clock=clock)
    await chat(client, user("x"), model="now")
    await chat(client, user("x"), model="never")
    await eventually(lambda: probe.closed == 1)
    assert states(client, "now") == []
    clock.advance(10**9)
    runtime_of(client).reap()
    assert states(client, "never") == ["idle"]


# ---------------------------------------------------------------------------------------- slots


async def test_an_instance_with_slots_serves_that_many_requests_at_once(start_app: AppFactory) -> None:
    probe = Probe(gated=True)
    config = make_config({"chat": fake_model(max_instances=1, slots=2)}, concurrency=8)
    client = await start_app(config, engines={"fake": probe.engine_class()})
    requests = [asyncio.ensure_future(chat(client, user(f"r{i}"))) for i in range(3)]
    await eventually(lambda: probe.active == 2)
    await asyncio.sleep(0.05)  # give a wrongly admitted third call the chance to show up
    assert probe.active == 2
    model = (await status(client))["models"]["chat"]
    assert model["waiting"] == 1
    assert [(i["state"], i["slots"], i["active_requests"]) for i in model["instances"]] == [("busy", 2, 2)]
    probe.gate.set()
    results = await asyncio.gather(*requests)
    assert [(code, body["choices"][0]["message"]["content"]) for code, body, _ in results] == [
        (200, f"r{i}") for i in range(3)
    ]
    assert (probe.created, probe.peak) == (1, 2)
    assert states(client) == ["idle"]


async def test_slots_fill_before_another_instance_loads(start_app: AppFactory) -> None:
    probe = Probe(gated=True)
    config = make_config({"chat": fake_model(max_instances=2, slots=2)}, concurrency=8)
    client = await start_app(config, engines={"fake": probe.engine_class()})
    requests = [asyncio.ensure_future(chat(client, user("r0")))]
    await eventually(lambda: probe.active == 1)
    requests.append(asyncio.ensure_future(chat(client, user("r1"))))
    await eventually(lambda: probe.active == 2)
    assert probe.created == 1  # the second request took the loaded instance's free slot
    requests.append(asyncio.ensure_future(chat(client, user("r2"))))
    await eventually(lambda: probe.active == 3)
    assert probe.created == 2  # no slot free: a second instance loaded
    probe.gate.set()
    assert [code for code, _, _ in await asyncio.gather(*requests)] == [200] * 3


async def test_ttl_zero_keeps_an_instance_while_any_of_its_slots_serves(start_app: AppFactory) -> None:
    probe = Probe()
    config = make_config({"chat": fake_model(ttl=0, max_instances=1, slots=2, token_delay=0.02)})
    client = await start_app(config, engines={"fake": probe.engine_class()})
    long_text = " ".join(["word"] * 40)
    long = asyncio.ensure_future(chat(client, user(long_text)))
    await eventually(lambda: probe.active == 1)
    code, body, _ = await chat(client, user("short"))
    assert (code, body["choices"][0]["message"]["content"]) == (200, "short")
    assert states(client) == ["busy"]  # the long answer still runs on it: not disposed
    code, body, _ = await long
    assert (code, body["choices"][0]["message"]["content"]) == (200, long_text)
    await eventually(lambda: probe.closed == 1)
    assert states(client) == []


async def test_a_follow_up_finds_the_slotted_instance_holding_its_conversation(start_app: AppFactory) -> None:
    # a and b fill both slots of the first instance, c loads the second; the first instance's last request
    # was b's, yet a's next turn (by its prefix, or by its session) goes back to it
    clock = ManualClock()
    client = await start_app(make_config({"chat": fake_model(max_instances=2, slots=2)}), clock=clock)
    conversations = {
        name: user(f"{name} conversation about {topic}")
        for name, topic in zip("abc", ("cats", "rain", "maps"), strict=True)
    }
    answers = {}
    for name, messages in conversations.items():
        _, answers[name], _ = await chat(client, messages, headers={"X-Session-Id": f"s-{name}"})
        clock.advance(1)
    assert instance_of(answers["a"]) == instance_of(answers["b"]) != instance_of(answers["c"])
    for turn, headers in (("two", {}), ("three", {"X-Session-Id": "s-a"})):
        messages = follow_up(conversations["a"], answers["a"], f"a {turn}")
        _, reply, _ = await chat(client, messages, headers=headers)
        assert instance_of(reply) == instance_of(answers["b"]), turn
        conversations["a"], answers["a"] = messages, reply
    # the first instance holds two conversations, the second one: a new one takes the second's free slot
    # rather than push b out of the first
    _, d, _ = await chat(client, user("d conversation about tea"))
    assert instance_of(d) == instance_of(answers["c"])
    messages = follow_up(conversations["b"], answers["b"], "b two")
    _, reply, _ = await chat(client, messages)
    assert instance_of(reply) == instance_of(answers["b"])


# -------------------------------------------------------------------------------------- waiting


async def test_waiters_are_served_in_fifo_order(start_app: AppFactory) -> None:
    probe = Probe(gated=True)
    client = await start_app(make_config({"chat": fake_model(max_instances=1)}), engines={"fake": probe.engine_class()})
    pool = runtime_of(client).pools["chat"]
    requests: list[asyncio.Future[Any]] = []
    for name in ["first", "second", "third", "fourth", "fifth"]:
        requests.append(asyncio.ensure_future(chat(client, user(name))))
        expected = len(requests)
        await eventually(lambda: probe.active + pool.waiting == expected)  # noqa: B023 - awaited right here
    probe.gate.set()
    await asyncio.gather(*requests)
    assert probe.seen == ["first", "second", "third", "fourth", "fifth"]


async def test_a_waiter_that_disconnects_leaves_the_queue_at_once(start_app: AppFactory) -> None:
    probe = Probe(gated=True)
    client = await start_app(make_config({"chat": fake_model(max_instances=1)}), engines={"fake": probe.engine_class()})
    pool = runtime_of(client).pools["chat"]
    running = asyncio.ensure_future(chat(client, user("running")))
    await eventually(lambda: probe.active == 1)
    leaving = asyncio.ensure_future(chat(client, user("leaving")))
    await eventually(lambda: pool.waiting == 1)
    leaving.cancel()  # the client closes its connection
    await eventually(lambda: pool.waiting == 0)
    assert (await status(client))["models"]["chat"]["waiting"] == 0
    probe.gate.set()
    code, _, _ = await running
    assert code == 200
    assert probe.seen == ["running"]


async def test_max_waiting_answers_429_with_retry_after(start_app: AppFactory) -> None:
    probe = Probe(gated=True)
    config = make_config({"chat": fake_model(max_instances=1, max_waiting=1)})
    client = await start_app(config, engines={"fake": probe.engine_class()})
    pool = runtime_of(client).pools["chat"]
    running = asyncio.ensure_future(chat(client, user("a")))
    await eventually(lambda: probe.active == 1)
    waiting = asyncio.ensure_future(chat(client, user("b")))
    await eventually(lambda: pool.waiting == 1)
    async with sdk(client) as api:
        with pytest.raises(openai.RateLimitError) as error:
            await api.chat.completions.create(model="chat", messages=user("c"))
    assert error.value.response.headers["Retry-After"] == "1"
    assert error.value.code == "queue_full"
    probe.gate.set()
    assert [r[0] for r in await asyncio.gather(running, waiting)] == [200, 200]


async def test_queue_timeout_answers_503(start_app: AppFactory) -> None:
    clock = ManualClock()
    probe = Probe(gated=True)
    config = make_config({"chat": fake_model(max_instances=1, queue_timeout=30)})
    client = await start_app(config, engines={"fake": probe.engine_class()}, clock=clock)
    pool = runtime_of(client).pools["chat"]
    running = asyncio.ensure_future(chat(client, user("a")))
    await eventually(lambda: probe.active == 1)
    waiting = asyncio.ensure_future(chat(client, user("b")))
    await eventually(lambda: pool.waiting == 1)
    clock.advance(29)
    runtime_of(client).reap()
    assert not waiting.done()
    clock.advance(2)
    runtime_of(client).reap()
    code, body, _ = await waiting
    assert code == 503
    assert body["error"]["code"] == "queue_timeout"
    assert "30s" in body["error"]["message"]
    probe.gate.set()
    assert (await running)[0] == 200


# ------------------------------------------------------------------------------------- affinity


def follow_up(messages: list[dict[str, Any]], answer: dict[str, Any], text: str) -> list[dict[str, Any]]:
    return [*messages, {"role": "assistant", "content": answer["choices"][0]["message"]["content"]}, *user(text)]


def instance_of(body: dict[str, Any]) -> str:
    # chatcmpl-<instance id>-<random>
    return body["id"].removeprefix("chatcmpl-").rsplit("-", 1)[0]


async def test_interleaved_conversations_return_to_their_own_instances(start_app: AppFactory) -> None:
    probe = Probe(gated=True)
    client = await start_app(make_config({"chat": fake_model(max_instances=2)}), engines={"fake": probe.engine_class()})
    x = user("x one about cats")
    y = user("y one about dogs")
    both = [asyncio.ensure_future(chat(client, x)), asyncio.ensure_future(chat(client, y))]
    await eventually(lambda: probe.active == 2)
    probe.gate.set()
    (_, x_answer, _), (_, y_answer, _) = await asyncio.gather(*both)
    homes = {"x": instance_of(x_answer), "y": instance_of(y_answer)}
    assert homes["x"] != homes["y"]

    for turn in ("two", "three"):
        for name, convo, answer in (("x", x, x_answer), ("y", y, y_answer)):
            messages = follow_up(convo, answer, f"{name} {turn}")
            _, reply, _ = await chat(client, messages)
            assert instance_of(reply) == homes[name]
            # everything before the new user message was already evaluated there
            assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == reply["usage"]["prompt_tokens"] - 4
            if name == "x":
                x, x_answer = messages, reply
            else:
                y, y_answer = messages, reply


async def test_preload_is_a_cache_hit_on_the_first_request(start_app: AppFactory) -> None:
    system = {"role": "system", "content": "You are the Batman and speak in short sentences"}
    config = make_config({"chat": fake_model(min_instances=1, preload={"messages": [system]})})
    client = await start_app(config)
    await eventually(lambda: states(client) == ["idle"])
    _, body, _ = await chat(client, [system, *user("who are you")])
    # "<system>" and the nine words of the system message were evaluated when the instance was created
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 10
    assert (await status(client))["models"]["chat"]["instances"][0]["context_tokens"] > 10


async def test_lru_instance_is_taken_and_reset_when_all_hold_other_contexts(start_app: AppFactory) -> None:
    clock = ManualClock()
    client = await start_app(make_config({"chat": fake_model(max_instances=2)}), clock=clock)
    _, x, _ = await chat(client, user("x conversation"))
    clock.advance(1)
    _, y, _ = await chat(client, user("y conversation"))
    assert instance_of(x) != instance_of(y)
    clock.advance(1)
    _, z, _ = await chat(client, user("z conversation"))
    assert instance_of(z) == instance_of(x)  # least recently used
    clock.advance(1)
    # y's instance still holds y: a follow-up goes there
    _, y2, _ = await chat(client, follow_up(user("y conversation"), y, "more"))
    assert instance_of(y2) == instance_of(y)


# ---------------------------------------------------------------------------------------- failures


async def read_sse(response: Any) -> list[Any]:
    events = []
    async for line in response.content:
        text = line.decode().strip()
        if text.startswith("data: "):
            payload = text.removeprefix("data: ")
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def test_engine_failure_mid_stream_is_an_error_event_and_the_instance_is_replaced(
    start_app: AppFactory,
) -> None:
    config = make_config({"chat": fake_model(fail_after_tokens=1)})
    client = await start_app(config)
    response = await client.post(
        "/v1/chat/completions", json={"model": "chat", "messages": user("a b c"), "stream": True}
    )
    events = await read_sse(response)
    assert events[1]["choices"][0]["delta"]["content"] == "a"
    assert set(events[-1]) == {"error"}
    assert events[-1]["error"]["code"] == "engine_error"
    assert "[DONE]" not in events
    await eventually(lambda: not runtime_of(client).pools["chat"].instances)
    # the next request gets a new instance (which fails the same way after one token, as configured)
    _, body, _ = await chat(client, user("z"))
    assert body["choices"][0]["message"]["content"] == "z"
    assert instance_of(body) == "chat-2"


async def test_disconnect_mid_stream_stops_the_engine_within_one_token(start_app: AppFactory) -> None:
    probe = Probe()
    config = make_config({"chat": fake_model(token_delay=0.01)})
    client = await start_app(config, engines={"fake": probe.engine_class()})
    long_text = " ".join(f"w{i}" for i in range(2000))
    response = await client.post(
        "/v1/chat/completions", json={"model": "chat", "messages": user(long_text), "stream": True}
    )
    for _ in range(3):
        await response.content.readline()
    response.close()
    await eventually(lambda: probe.active == 0 and states(client) == ["idle"])
    assert probe.events_after_cancel <= 1
    instance = runtime_of(client).pools["chat"].instances[0]
    assert instance.cached_tokens < 100  # it stopped long before the 2000-word answer


async def test_shutdown_lets_requests_in_flight_finish_and_disposes_everything(start_app: AppFactory) -> None:
    probe = Probe(gated=True)
    config = make_config({"chat": fake_model(min_instances=1, max_instances=2)}, shutdown_grace=30)
    client = await start_app(config, engines={"fake": probe.engine_class()})
    in_flight = asyncio.ensure_future(chat(client, user("finishing")))
    await eventually(lambda: probe.active == 1)
    runtime = runtime_of(client)
    stopping = asyncio.ensure_future(runtime.stop())
    code, body, _ = await chat(client, user("too late"))
    assert code == 503
    assert body["error"]["code"] == "shutting_down"
    probe.gate.set()
    code, body, _ = await in_flight
    assert code == 200
    assert body["choices"][0]["message"]["content"] == "finishing"
    await stopping
    assert probe.closed == probe.created
    assert runtime.pools["chat"].instances == []


async def test_a_stop_while_a_failed_load_is_being_freed_lets_the_freeing_finish(
    start_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A failed load's instance is freed after its waiters hear the error; a stop that comes meanwhile
    # cancels the pool's loads, and must not cut that freeing short (a worker's pipes left open, or a
    # worker left running). The freeing here waits for the test, so the stop surely comes in the middle.
    client = await start_app(make_config({"chat": fake_model(fail_on_load=True)}))
    freeing, release = asyncio.Event(), asyncio.Event()
    freed: list[str] = []
    cut_short: list[str] = []
    dispose = ModelInstance.dispose

    async def slow_dispose(self: ModelInstance, grace: float | None = None) -> None:
        freeing.set()
        try:
            await release.wait()
        except asyncio.CancelledError:
            cut_short.append(self.id)
            raise
        await dispose(self, grace)
        freed.append(self.id)

    monkeypatch.setattr(ModelInstance, "dispose", slow_dispose)
    code, body, _ = await chat(client, user("hello"))
    assert code == 503, body
    await freeing.wait()
    stopping = asyncio.ensure_future(runtime_of(client).stop())
    for _ in range(50):  # the stop runs up to where it cancels the loads (no I/O on the way: a few turns)
        await asyncio.sleep(0)
    release.set()
    await stopping
    assert cut_short == []
    assert len(freed) == 1
