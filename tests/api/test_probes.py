"""GET /ready and draining, through the whole app on an instrumented FakeEngine. (The SIGTERM that starts
a drain is tested on a real process: tests/test_daemon_process.py and tests/test_nginx.py.)"""

from __future__ import annotations

import asyncio

from aiohttp.test_utils import TestClient

from lllmsd.api.keys import RUNTIME
from lllmsd.api.probes import DRAIN
from tests.api.probe import Probe, eventually
from tests.conftest import AppFactory, fake_model, make_config

HELLO = [{"role": "user", "content": "the quick brown fox"}]


def loaded(client: TestClient, model: str) -> bool:
    return any(i.state.value == "idle" for i in client.server.app[RUNTIME].pools[model].instances)


async def test_ready_once_every_model_with_min_instances_has_loaded(start_app: AppFactory) -> None:
    probe = Probe(load_gated=True)
    config = make_config(
        {
            "kept": fake_model(min_instances=1, load_delay=0.001),  # its load waits at the probe's load gate
            "on-demand": fake_model(),  # min_instances 0: loads on its first request; readiness ignores it
        },
        api_keys=["sk-probe"],  # probes carry no credentials
    )
    client = await start_app(config, engines={"fake": probe.engine_class()})
    response = await client.get("/ready")
    assert response.status == 503
    error = (await response.json())["error"]
    assert error["code"] == "not_ready"
    assert "kept" in error["message"]
    assert "on-demand" not in error["message"]

    probe.load_gate.set()
    await eventually(lambda: loaded(client, "kept"))
    response = await client.get("/ready")
    assert response.status == 200
    assert await response.json() == {"status": "ready"}


async def test_draining_refuses_new_requests_and_finishes_the_running_ones(start_app: AppFactory) -> None:
    probe = Probe(gated=True)
    client = await start_app(make_config({"chat": fake_model(max_instances=1)}), engines={"fake": probe.engine_class()})
    pool = client.server.app[RUNTIME].pools["chat"]
    body = {"model": "chat", "messages": HELLO}
    running = asyncio.ensure_future(client.post("/v1/chat/completions", json=body))
    await eventually(lambda: probe.active == 1)
    queued = asyncio.ensure_future(client.post("/v1/chat/completions", json=body))
    await eventually(lambda: pool.waiting == 1)
    assert (await client.get("/ready")).status == 200

    drain = client.server.app[DRAIN]
    drain.start()  # what SIGTERM does (server.py)
    assert drain.in_flight == 2  # the running request and the queued one

    not_ready = await client.get("/ready")
    assert not_ready.status == 503
    assert (await not_ready.json())["error"]["code"] == "not_ready"
    assert (await client.get("/health")).status == 200  # liveness holds: nothing to restart
    assert (await client.get("/metrics")).status == 200
    for refused in (await client.post("/v1/chat/completions", json=body), await client.get("/v1/models")):
        assert refused.status == 503
        assert refused.headers["Connection"] == "close"  # a balancer must not reuse this connection
        assert (await refused.json())["error"]["code"] == "shutting_down"
    assert not await drain.wait_idle(0.01)  # the two requests are still in the daemon

    probe.gate.set()
    for accepted in await asyncio.gather(running, queued):
        assert accepted.status == 200  # both finished: draining cuts nothing that was already in
        assert (await accepted.json())["choices"][0]["message"]["content"]
    assert await drain.wait_idle(1)
    assert drain.in_flight == 0
