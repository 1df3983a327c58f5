"""X-Request-Id: an incoming one is honoured, otherwise one is made; it is returned and logged."""

from __future__ import annotations

import logging

import pytest
from aiohttp.test_utils import TestClient

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}


async def test_an_incoming_id_is_returned_and_logged(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lllmsd.access"):
        response = await client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "trace-abc.1:2"})
    assert response.status == 200
    assert response.headers["X-Request-Id"] == "trace-abc.1:2"
    assert "request_id=trace-abc.1:2" in caplog.text
    assert "model=chat status=200" in caplog.text


async def test_without_one_an_id_is_made_per_request(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lllmsd.access"):
        first = await client.get("/v1/models")
        second = await client.get("/v1/models")
    ids = [first.headers["X-Request-Id"], second.headers["X-Request-Id"]]
    assert all(len(i) >= 16 for i in ids)
    assert ids[0] != ids[1]
    assert all(f"request_id={i}" in caplog.text for i in ids)


@pytest.mark.parametrize("unsafe", ["has space", "x" * 129, "new\tline", "ünïcode", "semi;colon"])
async def test_an_unsafe_incoming_id_is_replaced(client: TestClient, unsafe: str) -> None:
    # a client cannot inject text into the log line or the header
    response = await client.get("/v1/models", headers={"X-Request-Id": unsafe})
    assert response.status == 200
    assert response.headers["X-Request-Id"] != unsafe
    assert len(response.headers["X-Request-Id"]) >= 16


async def test_errors_and_streams_carry_the_id_too(client: TestClient) -> None:
    missing = await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers={"X-Request-Id": "r-1"})
    assert missing.status == 404
    assert missing.headers["X-Request-Id"] == "r-1"
    stream = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers={"X-Request-Id": "r-2"})
    assert stream.status == 200
    assert stream.headers["X-Request-Id"] == "r-2"
    assert (await stream.text()).endswith("data: [DONE]\n\n")
