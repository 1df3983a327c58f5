"""The memory budget across models, through the whole HTTP app on a FakeEngine whose instances declare
their size (``memory_estimate``), with an injected clock. Independently of the budget's own bookkeeping,
the engines count the declared bytes of every engine object alive (built and not yet closed): no engine
is ever built while that, itself included, would exceed the budget."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from lllmsd.api.keys import RUNTIME
from lllmsd.core.clock import ManualClock
from lllmsd.core.runtime import Runtime
from tests.api.probe import Probe, eventually
from tests.conftest import AppFactory, fake_model, make_config

MIB = 2**20


class MemoryProbe(Probe):
    """A Probe whose engines add up the memory they declare while they live."""

    def __init__(self, *, gated: bool = False) -> None:
        super().__init__(gated=gated)
        self.live: dict[int, int] = {}
        self.peak_live = 0
        self.built = 0  # engines built

    def engine_class(self) -> type:
        probe = self
        base = super().engine_class()

        class SizedFake(base):  # type: ignore[misc,valid-type]
            def __init__(self, config: Any, files: Any) -> None:
                super().__init__(config, files)
                with probe.lock:
                    probe.live[id(self)] = int(config.memory_estimate)
                    probe.peak_live = max(probe.peak_live, sum(probe.live.values()))
                    probe.built += 1

            def close(self) -> None:
                with probe.lock:
                    probe.live.pop(id(self), None)
                super().close()

        return SizedFake


def config_of(models: dict[str, tuple[int, dict[str, Any]]], budget_mib: int, **daemon: Any) -> Any:
    return make_config(
        {name: fake_model(memory_estimate=f"{mib}MiB", ttl=-1, **opts) for name, (mib, opts) in models.items()},
        memory_budget=f"{budget_mib}MiB",
        **daemon,
    )


def runtime_of(client: TestClient) -> Runtime:
    return client.server.app[RUNTIME]


async def chat(client: TestClient, model: str, text: str = "hello") -> tuple[int, Any]:
    response = await client.post(
        "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": text}]}
    )
    return response.status, await response.json()


def instance_ids(client: TestClient, model: str) -> list[str]:
    return [i.id for i in runtime_of(client).pools[model].instances]


async def test_a_second_model_past_the_budget_evicts_the_idle_instance_of_the_first(start_app: AppFactory) -> None:
    probe = MemoryProbe()
    config = config_of({"a": (600, {}), "b": (600, {})}, budget_mib=1000)
    client = await start_app(config, engines={"fake": probe.engine_class()})
    runtime = runtime_of(client)

    assert (await chat(client, "a"))[0] == 200
    assert instance_ids(client, "a") == ["a-1"]
    code, body = await chat(client, "b")
    assert code == 200, body
    await eventually(lambda: not instance_ids(client, "a"))
    assert instance_ids(client, "b") == ["b-1"]
    assert probe.peak_live <= 1000 * MIB
    memory = runtime.budget.status()
    assert memory["evictions"] == 1
    assert memory["recent_evictions"][0] | {"at": 0} == {
        "instance": "a-1",
        "model": "a",
        "bytes": 600 * MIB,
        "for": "b-1",
        "at": 0,
    }
    assert memory["used_bytes"] == 600 * MIB


async def test_eviction_takes_the_least_recently_used_idle_instance_of_any_model(start_app: AppFactory) -> None:
    clock = ManualClock()
    probe = MemoryProbe()
    config = config_of({"a": (300, {}), "b": (300, {}), "c": (300, {}), "d": (300, {})}, budget_mib=1000)
    client = await start_app(config, engines={"fake": probe.engine_class()}, clock=clock)
    for model in ("a", "b", "c", "a"):  # a is used again last: b is now the least recently used
        assert (await chat(client, model))[0] == 200
        clock.advance(10)
    assert (await chat(client, "d"))[0] == 200
    await eventually(lambda: not instance_ids(client, "b"))
    assert [instance_ids(client, m) for m in "acd"] == [["a-1"], ["c-1"], ["d-1"]]
    assert [e["instance"] for e in runtime_of(client).budget.status()["recent_evictions"]] == ["b-1"]
    assert probe.peak_live <= 1000 * MIB


async def test_with_every_instance_busy_the_load_waits_and_is_served_when_one_frees(start_app: AppFactory) -> None:
    probe = MemoryProbe(gated=True)
    config = config_of({"a": (600, {}), "b": (600, {})}, budget_mib=1000, concurrency=4)
    client = await start_app(config, engines={"fake": probe.engine_class()})
    runtime = runtime_of(client)

    first = asyncio.ensure_future(chat(client, "a", "long answer"))
    await eventually(lambda: probe.active == 1)
    second = asyncio.ensure_future(chat(client, "b"))
    await eventually(lambda: runtime.budget.status()["loads_waiting"] == 1)
    (waiting,) = runtime.pools["b"].instances
    assert waiting.state.value == "loading"
    assert waiting.waiting_for_memory
    assert waiting.status()["memory_estimate_bytes"] == 600 * MIB
    assert probe.built == 1  # b's engine is not built while a's holds the memory
    assert runtime.pools["b"].waiting == 1

    probe.gate.set()
    assert (await first)[0] == 200
    code, body = await second
    assert code == 200, body
    assert body["choices"][0]["message"]["content"] == "hello"
    assert instance_ids(client, "a") == []
    assert probe.peak_live <= 1000 * MIB


async def test_a_load_waiting_for_memory_keeps_the_queue_rules(start_app: AppFactory) -> None:
    clock = ManualClock()
    probe = MemoryProbe(gated=True)
    config = config_of({"a": (600, {}), "b": (600, {"queue_timeout": 30})}, budget_mib=1000, concurrency=4)
    client = await start_app(config, engines={"fake": probe.engine_class()}, clock=clock)
    runtime = runtime_of(client)
    first = asyncio.ensure_future(chat(client, "a"))
    await eventually(lambda: probe.active == 1)
    second = asyncio.ensure_future(chat(client, "b"))
    await eventually(lambda: runtime.budget.status()["loads_waiting"] == 1)

    clock.advance(31)
    runtime.reap()
    code, body = await second
    assert code == 503
    assert body["error"]["code"] == "queue_timeout"
    # nobody needs b's instance any more: it stops waiting for memory and a is never evicted for it
    await eventually(lambda: runtime.budget.status()["loads_waiting"] == 0)
    assert instance_ids(client, "b") == []
    probe.gate.set()
    assert (await first)[0] == 200
    assert instance_ids(client, "a") == ["a-1"]
    assert runtime.budget.status()["evictions"] == 0


async def test_an_instance_larger_than_the_whole_budget_is_refused_at_once(start_app: AppFactory) -> None:
    client = await start_app(config_of({"huge": (2000, {})}, budget_mib=1000))
    code, body = await chat(client, "huge")
    assert code == 503
    assert "more than the whole memory_budget" in body["error"]["message"]


async def test_a_model_reuses_its_own_idle_instance_rather_than_wait_for_room(start_app: AppFactory) -> None:
    probe = MemoryProbe()
    config = config_of({"a": (600, {"max_instances": 3})}, budget_mib=1000)
    client = await start_app(config, engines={"fake": probe.engine_class()})
    for text in ("one conversation", "another conversation", "a third"):
        assert (await chat(client, "a", text))[0] == 200
    assert instance_ids(client, "a") == ["a-1"]
    assert probe.built == 1


async def test_min_instances_are_never_evicted(start_app: AppFactory) -> None:
    clock = ManualClock()
    config = config_of(
        {"a": (600, {"min_instances": 1}), "b": (600, {"queue_timeout": 5})}, budget_mib=1000, concurrency=4
    )
    client = await start_app(config, engines={"fake": MemoryProbe().engine_class()}, clock=clock)
    runtime = runtime_of(client)
    await eventually(lambda: [i.state.value for i in runtime.pools["a"].instances] == ["idle"])
    second = asyncio.ensure_future(chat(client, "b"))
    await eventually(lambda: runtime.budget.status()["loads_waiting"] == 1)
    clock.advance(6)
    runtime.reap()
    assert (await second)[0] == 503
    assert instance_ids(client, "a") == ["a-1"]


async def test_mixed_traffic_never_builds_past_the_budget(start_app: AppFactory) -> None:
    rng = random.Random(19)
    probe = MemoryProbe()
    sizes = {"a": 200, "b": 350, "c": 500}
    config = config_of(
        {m: (size, {"max_instances": 2, "max_waiting": 200}) for m, size in sizes.items()},
        budget_mib=1000,
        concurrency=3,
    )
    client = await start_app(config, engines={"fake": probe.engine_class()})
    models = [rng.choice("abc") for _ in range(90)]
    results = await asyncio.gather(*(chat(client, m, f"request {i}") for i, m in enumerate(models)))
    assert [code for code, _ in results] == [200] * len(models)
    assert all(body["choices"][0]["message"]["content"] == f"request {i}" for i, (_, body) in enumerate(results))
    assert 0 < probe.peak_live <= 1000 * MIB
    assert runtime_of(client).budget.status()["used_bytes"] <= 1000 * MIB


async def test_status_and_metrics_show_the_budget_the_estimates_and_the_evictions(start_app: AppFactory) -> None:
    config = config_of({"a": (600, {}), "b": (300, {})}, budget_mib=800)
    client = await start_app(config, engines={"fake": MemoryProbe().engine_class()})
    assert (await chat(client, "a"))[0] == 200
    assert (await chat(client, "b"))[0] == 200
    await eventually(lambda: not instance_ids(client, "a"))

    status = await (await client.get("/")).json()
    memory = status["memory"]
    assert (memory["budget_bytes"], memory["used_bytes"], memory["evictions"]) == (800 * MIB, 300 * MIB, 1)
    assert [(e["instance"], e["for"]) for e in memory["recent_evictions"]] == [("a-1", "b-1")]
    (instance,) = status["models"]["b"]["instances"]
    assert instance["memory_estimate_bytes"] == 300 * MIB
    assert instance["memory_estimate_source"] == "declared"
    assert instance["placement"] == {"backend": "fake", "device": "cpu"}

    text = await (await client.get("/metrics")).text()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("lllmsd_memory_budget_bytes", ())] == 800 * MIB
    assert samples[("lllmsd_memory_reserved_bytes", ())] == 300 * MIB
    assert samples[("lllmsd_memory_evictions_total", ())] == 1
    assert samples[("lllmsd_instance_memory_estimate_bytes", (("instance", "b-1"), ("model", "b")))] == 300 * MIB
