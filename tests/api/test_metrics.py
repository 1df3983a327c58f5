"""GET /metrics after real requests, parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from lllmsd.api.keys import RUNTIME
from lllmsd.app import create_app
from lllmsd.core.store import ModelStore
from tests.api.probe import Probe, eventually
from tests.conftest import AppFactory, fake_model, make_config, sdk

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
FIRST = [{"role": "user", "content": "the quick brown fox"}]


async def scrape(client: TestClient, **headers: str) -> Samples:
    response = await client.get("/metrics", headers=headers)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")  # the text exposition format
    samples: Samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over the series of ``name`` that carry at least ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def test_requests_tokens_and_cache_hits_after_a_few_requests(client: TestClient) -> None:
    async with sdk(client) as api:
        first = await api.chat.completions.create(model="chat", messages=FIRST)  # type: ignore[arg-type]
        follow_up = [
            *FIRST,
            {"role": "assistant", "content": "the quick brown fox"},
            {"role": "user", "content": "jumps over"},
        ]
        stream = await api.chat.completions.create(
            model="chat",
            messages=follow_up,
            stream=True,
            stream_options={"include_usage": True},  # type: ignore[arg-type]
        )
        chunks = [chunk async for chunk in stream]
        await api.completions.create(model="chat", prompt="one two three")
    assert (await client.post("/v1/chat/completions", json={"model": "nope", "messages": FIRST})).status == 404
    assert (await client.get("/v1/models")).status == 200
    assert (await client.get("/no/such/route")).status == 404

    samples = await scrape(client)
    chat_route = "/v1/chat/completions"
    assert value(samples, "lllmsd_requests_total", route=chat_route, model="chat", status="200") == 2
    assert value(samples, "lllmsd_requests_total", route="/v1/completions", model="chat", status="200") == 1
    # a model nobody configured is one label, whatever the client sent
    assert value(samples, "lllmsd_requests_total", route=chat_route, model="(unknown)", status="404") == 1
    assert value(samples, "lllmsd_requests_total", route="/v1/models", model="", status="200") == 1
    assert value(samples, "lllmsd_requests_total", route="(unmatched)", model="", status="404") == 1
    assert value(samples, "lllmsd_request_duration_seconds_count", route=chat_route, model="chat") == 2
    assert value(samples, "lllmsd_request_duration_seconds_bucket", route=chat_route, model="chat", le="+Inf") == 2
    assert value(samples, "lllmsd_request_duration_seconds_sum", route=chat_route, model="chat") > 0

    usage = [first.usage, chunks[-1].usage]
    assert all(u is not None for u in usage)
    completion_tokens = sum(u.completion_tokens for u in usage if u) + 3  # the completion echoes 3 words
    assert value(samples, "lllmsd_generated_tokens_total", model="chat") == completion_tokens
    cached = sum(u.prompt_tokens_details.cached_tokens for u in usage if u and u.prompt_tokens_details)
    assert cached > 0  # the follow-up reused the first turn on the same instance
    assert value(samples, "lllmsd_cached_prompt_tokens_total", model="chat") >= cached
    assert value(samples, "lllmsd_prompt_cache_hits_total", model="chat") >= 1
    assert value(samples, "lllmsd_time_to_first_token_seconds_count", model="chat") == 3
    # one instance served everything and is idle now
    assert value(samples, "lllmsd_instances", model="chat", state="idle") == 1
    assert value(samples, "lllmsd_instances", model="chat", state="busy") == 0
    assert value(samples, "lllmsd_queue_depth", model="chat") == 0
    assert value(samples, "lllmsd_concurrency_limit") == 2
    assert total(samples, "process_resident_memory_bytes") > 0


async def test_queue_depth_busy_instances_and_concurrency_while_a_request_waits(start_app: AppFactory) -> None:
    client = await start_app(make_config({"chat": fake_model(max_instances=1)}))
    pool = client.app[RUNTIME].pools["chat"]
    async with pool.acquire():
        waiting = asyncio.ensure_future(client.post("/v1/chat/completions", json={"model": "chat", "messages": FIRST}))
        await eventually(lambda: pool.waiting == 1)
        samples = await scrape(client)
        assert value(samples, "lllmsd_queue_depth", model="chat") == 1
        assert value(samples, "lllmsd_instances", model="chat", state="busy") == 1
        assert value(samples, "lllmsd_concurrency_in_use") == 1
    response = await waiting
    assert response.status == 200
    samples = await scrape(client)
    assert value(samples, "lllmsd_queue_depth", model="chat") == 0
    assert value(samples, "lllmsd_concurrency_in_use") == 0


async def test_each_app_counts_only_its_own_requests(start_app: AppFactory) -> None:
    one = await start_app()
    two = await start_app()
    for _ in range(3):
        assert (await one.get("/v1/models")).status == 200
    assert value(await scrape(one), "lllmsd_requests_total", route="/v1/models", model="", status="200") == 3
    assert total(await scrape(two), "lllmsd_requests_total", route="/v1/models") == 0


async def test_metrics_need_the_key_when_keys_are_set(start_app: AppFactory) -> None:
    client = await start_app(make_config(api_keys=["sk-metrics"]))
    assert (await client.get("/metrics")).status == 401
    samples = await scrape(client, Authorization="Bearer sk-metrics")
    assert value(samples, "lllmsd_requests_total", route="/metrics", model="", status="401") == 1


class DownloadingStore(ModelStore):
    """The real store, reporting a download in progress as its status() does."""

    def __init__(self, cache_dir: Path, figures: list[dict[str, Any]]) -> None:
        super().__init__(cache_dir)
        self.figures = figures

    def status(self) -> list[dict[str, Any]]:
        return self.figures


async def test_download_bytes_come_from_the_store(aiohttp_client: Any, tmp_path: Path) -> None:
    figures = [
        {"model": "chat", "file": "a.gguf", "state": "downloading", "bytes_done": 1500, "bytes_total": 4000},
        {"model": "chat", "file": "b.json", "state": "done", "bytes_done": 20, "bytes_total": 20},
        {"model": "other", "file": "c.bin", "state": "downloading", "bytes_done": 7, "bytes_total": None},
    ]
    store = DownloadingStore(tmp_path, figures)
    client = await aiohttp_client(create_app(make_config(), store=store, reap_interval=None))
    samples = await scrape(client)
    assert value(samples, "lllmsd_download_bytes", model="chat") == 1520
    assert value(samples, "lllmsd_download_size_bytes", model="chat") == 4020
    assert value(samples, "lllmsd_download_bytes", model="other") == 7
    assert value(samples, "lllmsd_download_size_bytes", model="other") == 0  # size not known yet
    figures[0]["bytes_done"] = 4000  # read at scrape time, never stale
    assert value(await scrape(client), "lllmsd_download_bytes", model="chat") == 4020


async def test_load_gauges_with_the_meaning_inference_gateways_read(start_app: AppFactory) -> None:
    probe = Probe(gated=True)
    config = make_config({"chat": fake_model(max_instances=2, context_size=256)}, concurrency=1)
    client = await start_app(config, engines={"fake": probe.engine_class()})
    pool = client.app[RUNTIME].pools["chat"]
    body = {"model": "chat", "messages": FIRST}
    running = asyncio.ensure_future(client.post("/v1/chat/completions", json=body))
    await eventually(lambda: probe.active == 1)
    queued = [asyncio.ensure_future(client.post("/v1/chat/completions", json=body)) for _ in range(2)]
    await eventually(lambda: pool.waiting == 2)  # one slot of concurrency: two wait
    samples = await scrape(client)
    assert value(samples, "lllmsd_num_requests_running", model="chat") == 1
    assert value(samples, "lllmsd_num_requests_waiting", model="chat") == 2
    probe.gate.set()
    assert [r.status for r in await asyncio.gather(running, *queued)] == [200, 200, 200]

    samples = await scrape(client)
    assert value(samples, "lllmsd_num_requests_running", model="chat") == 0
    assert value(samples, "lllmsd_num_requests_waiting", model="chat") == 0
    instances = (await (await client.get("/")).json())["models"]["chat"]["instances"]
    held = sum(i["context_tokens"] for i in instances)
    assert held > 0
    assert all(i["context_size"] == 256 for i in instances)
    # what the instances hold over what max_instances instances of this context window could hold
    assert value(samples, "lllmsd_kv_cache_usage_perc", model="chat") == held / (256 * 2)
    prompt = value(samples, "lllmsd_prompt_tokens_total", model="chat")
    cached = value(samples, "lllmsd_cached_prompt_tokens_total", model="chat")
    assert cached > 0  # the same prompt three times: the later ones found it cached
    assert value(samples, "lllmsd_evaluated_prompt_tokens_total", model="chat") == prompt - cached


async def test_requests_running_counts_each_request_on_an_instance_with_slots(start_app: AppFactory) -> None:
    probe = Probe(gated=True)
    config = make_config({"chat": fake_model(max_instances=1, slots=3)}, concurrency=8)
    client = await start_app(config, engines={"fake": probe.engine_class()})
    body = {"model": "chat", "messages": FIRST}
    running = [asyncio.ensure_future(client.post("/v1/chat/completions", json=body)) for _ in range(2)]
    await eventually(lambda: probe.active == 2)
    samples = await scrape(client)
    assert value(samples, "lllmsd_num_requests_running", model="chat") == 2  # one busy instance, two requests
    probe.gate.set()
    assert [r.status for r in await asyncio.gather(*running)] == [200, 200]
