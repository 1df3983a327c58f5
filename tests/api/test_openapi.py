"""GET /openapi.json: every route described, request schemas are the validating models' own, and real
responses of every route conform to the document (validated by a JSON Schema validator, not pydantic)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from aiohttp import FormData, web
from aiohttp.test_utils import TestClient

from lllmsd.api.openapi import REF, build_document, undocumented_routes
from lllmsd.api.schemas.embeddings import EmbeddingRequest
from lllmsd.api.schemas.rerank import RerankRequest
from lllmsd.api.schemas.responses import ResponseCreateRequest
from lllmsd.api.schemas.text import ChatCompletionRequest, CompletionRequest
from lllmsd.app import create_app
from tests.conftest import AppFactory, fake_model, make_config

MODELS = {
    "chat": fake_model(),
    "emb": {"task": "embedding", "engine": "fake"},
    "stt": {"task": "speech-to-text", "engine": "fake"},
    "tts": {"task": "text-to-speech", "engine": "fake"},
}


@pytest.fixture
async def daemon(start_app: AppFactory) -> TestClient:
    return await start_app(make_config(MODELS))


async def document_of(client: TestClient) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status == 200
    return await response.json()


class Conformance:
    """Validates bodies against the served document's schemas (refs resolved inside the document)."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document

    def schema(self, path: str, method: str, status: int, media: str = "application/json") -> dict[str, Any]:
        return self.document["paths"][path][method]["responses"][str(status)]["content"][media]["schema"]

    def check(self, body: Any, schema: dict[str, Any]) -> None:
        root = {**schema, "components": self.document["components"]}
        validator = jsonschema_rs.validator_for(root)
        errors = [str(error) for error in validator.iter_errors(body)]
        assert not errors, errors

    def check_response(self, path: str, method: str, status: int, body: Any) -> None:
        self.check(body, self.schema(path, method, status))

    def check_event(self, path: str, event: Any) -> None:
        media = self.document["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]
        self.check({"data": json.dumps(event)}, media["schema"])  # the event as schemathesis reads it
        self.check(event, media["schema"]["properties"]["data"]["anyOf"][0]["contentSchema"])  # its JSON payload

    def component(self, name: str) -> dict[str, Any]:
        return {"$ref": REF.format(model=name)}


def sse_events(text: str) -> list[Any]:
    lines = [line.removeprefix("data: ") for line in text.split("\n") if line.startswith("data: ")]
    return [json.loads(line) for line in lines if line != "[DONE]"]


# ----------------------------------------------------------------------------------------- the document


async def test_every_route_is_documented_once_per_method(daemon: TestClient) -> None:
    document = await document_of(daemon)
    assert document["openapi"] == "3.1.0"
    assert undocumented_routes(document) == []
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in daemon.server.app.router.routes()
        if route.method != "HEAD"
    }
    documented = {(method, path) for path, methods in document["paths"].items() for method in methods}
    assert documented == served
    for prefix in ("/v1", "/openai/v1"):
        for path in ("/chat/completions", "/completions", "/embeddings", "/audio/transcriptions", "/models"):
            assert f"{prefix}{path}" in document["paths"]
    assert {"/", "/health", "/metrics", "/openapi.json"} <= set(document["paths"])


async def test_the_document_loads_in_schemathesis_with_every_operation(daemon: TestClient) -> None:
    schema = schemathesis.openapi.from_dict(await document_of(daemon))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == sum(len(methods) for methods in (await document_of(daemon))["paths"].values())


async def test_an_undocumented_route_is_flagged() -> None:
    app = create_app(make_config(MODELS))

    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_get("/secret-new-route", handler)
    assert undocumented_routes(build_document(app)) == ["GET /secret-new-route"]


def test_conformance_rejects_a_response_that_breaks_its_schema() -> None:
    spec = Conformance(build_document(create_app(make_config(MODELS))))
    good = {"object": "list", "data": [{"id": "chat", "object": "model", "created": 1, "owned_by": "lllmsd"}]}
    spec.check_response("/v1/models", "get", 200, good)
    for bad in ({**good, "extra": 1}, {"object": "list"}, {**good, "data": [{"id": "chat"}]}):
        with pytest.raises(AssertionError):
            spec.check_response("/v1/models", "get", 200, bad)


@pytest.mark.parametrize(
    ("path", "model"),
    [
        ("/v1/chat/completions", ChatCompletionRequest),
        ("/v1/completions", CompletionRequest),
        ("/v1/embeddings", EmbeddingRequest),
        ("/v1/responses", ResponseCreateRequest),
        ("/v1/rerank", RerankRequest),
        ("/v2/rerank", RerankRequest),
    ],
)
async def test_request_schemas_are_the_validating_models(daemon: TestClient, path: str, model: type) -> None:
    document = await document_of(daemon)
    ref = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    served = document["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    own = model.model_json_schema(ref_template=REF)
    own.pop("$defs", None)
    assert served == own
    assert served["additionalProperties"] is False  # unknown fields are refused, and documented as such


async def test_every_error_status_is_documented_with_the_envelope(daemon: TestClient) -> None:
    document = await document_of(daemon)
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "404", "413", "415", "429", "500", "503"} <= set(chat)
    for status, response in chat.items():
        if status != "200":
            assert response["content"]["application/json"]["schema"] == {"$ref": REF.format(model="ErrorResponse")}
    assert "401" not in chat  # no api_keys configured: no 401 can happen
    envelope = document["components"]["schemas"]["ErrorResponse"]
    detail = document["components"]["schemas"]["ErrorDetail"]
    assert envelope["required"] == ["error"]
    assert sorted(detail["required"]) == ["code", "message", "param", "type"]


async def test_with_api_keys_the_document_requires_a_bearer_token_except_for_health(start_app: AppFactory) -> None:
    client = await start_app(make_config(MODELS, api_keys=["sk-test-123"]))
    response = await client.get("/openapi.json", headers={"Authorization": "Bearer sk-test-123"})
    document = await response.json()
    assert document["security"] == [{"bearer": []}]
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert "401" in document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert document["paths"]["/health"]["get"]["security"] == []
    assert "401" not in document["paths"]["/health"]["get"]["responses"]
    assert "sk-test-123" not in json.dumps(document)
    assert (await client.get("/openapi.json")).status == 401


# ------------------------------------------------------------------------- real responses conform to it


async def test_text_responses_and_stream_chunks_conform(daemon: TestClient) -> None:
    spec = Conformance(await document_of(daemon))
    messages = [{"role": "user", "content": "the quick brown fox"}]
    bodies = [
        {"model": "chat", "messages": messages},
        {"model": "chat", "messages": messages, "n": 2, "logprobs": True, "top_logprobs": 2},
        {
            "model": "chat",
            "messages": messages,
            "tool_choice": "required",
            "tools": [{"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}}],
        },
    ]
    for body in bodies:
        response = await daemon.post("/v1/chat/completions", json=body)
        assert response.status == 200
        spec.check_response("/v1/chat/completions", "post", 200, await response.json())
        streamed = await daemon.post(
            "/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
        )
        assert streamed.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(await streamed.text())
        assert len(events) > 3
        for event in events:
            spec.check_event("/v1/chat/completions", event)
        assert (await streamed.text()).endswith("data: [DONE]\n\n")
        media = spec.document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
        spec.check({"data": "[DONE]"}, media["text/event-stream"]["schema"])
    for body in ({"model": "chat", "prompt": "one two"}, {"model": "chat", "prompt": "one two", "logprobs": 2}):
        response = await daemon.post("/v1/completions", json=body)
        spec.check_response("/v1/completions", "post", 200, await response.json())
        streamed = await daemon.post("/v1/completions", json={**body, "stream": True})
        for event in sse_events(await streamed.text()):
            spec.check_event("/v1/completions", event)


async def test_embedding_model_and_daemon_responses_conform(daemon: TestClient) -> None:
    spec = Conformance(await document_of(daemon))
    for fmt in ("float", "base64"):
        body = {"model": "emb", "input": ["a", "b"], "encoding_format": fmt}
        response = await daemon.post("/v1/embeddings", json=body)
        spec.check_response("/v1/embeddings", "post", 200, await response.json())
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        body = {"model": "emb", "query": "a", "documents": ["a", {"text": "b"}], "top_n": 1}
        spec.check_response(path, "post", 200, await (await daemon.post(path, json=body)).json())
    spec.check_response("/v1/models", "get", 200, await (await daemon.get("/v1/models")).json())
    spec.check_response("/v1/models/{model}", "get", 200, await (await daemon.get("/v1/models/chat")).json())
    spec.check_response("/health", "get", 200, await (await daemon.get("/health")).json())
    await daemon.post("/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "x"}]})
    status = await (await daemon.get("/")).json()
    assert status["models"]["chat"]["instances"]  # the status with an instance in it, not just an empty one
    spec.check_response("/", "get", 200, status)


async def test_audio_responses_conform(daemon: TestClient) -> None:
    spec = Conformance(await document_of(daemon))

    def form(**fields: str) -> FormData:
        data = FormData()
        for name, value in fields.items():
            data.add_field(name, value)
        data.add_field("file", b"\0" * 64000, filename="a.wav", content_type="audio/wav")
        return data

    for fmt in ("json", "verbose_json"):
        response = await daemon.post("/v1/audio/transcriptions", data=form(model="stt", response_format=fmt))
        assert response.status == 200
        spec.check_response("/v1/audio/transcriptions", "post", 200, await response.json())
    response = await daemon.post("/v1/audio/translations", data=form(model="stt", response_format="verbose_json"))
    spec.check_response("/v1/audio/translations", "post", 200, await response.json())
    streamed = await daemon.post("/v1/audio/transcriptions", data=form(model="stt", stream="true"))
    events = sse_events(await streamed.text())
    assert events[-1]["type"] == "transcript.text.done"
    for event in events:
        spec.check_event("/v1/audio/transcriptions", event)


async def test_speech_responses_conform(daemon: TestClient) -> None:
    spec = Conformance(await document_of(daemon))
    documented = spec.document["paths"]["/v1/audio/speech"]["post"]["responses"]["200"]["content"]
    for fmt in ("mp3", "opus", "aac", "flac", "wav", "pcm"):
        response = await daemon.post(
            "/v1/audio/speech", json={"model": "tts", "voice": "alloy", "input": "Hi.", "response_format": fmt}
        )
        assert response.status == 200
        assert response.headers["Content-Type"] in documented
        assert await response.read()
    streamed = await daemon.post(
        "/v1/audio/speech", json={"model": "tts", "voice": "alloy", "input": "Hi. Bye.", "stream_format": "sse"}
    )
    events = sse_events(await streamed.text())
    assert [e["type"] for e in events][-1] == "speech.audio.done"
    for event in events:
        spec.check_event("/v1/audio/speech", event)


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        (
            "post",
            "/v1/chat/completions",
            {"json": {"model": "nope", "messages": [{"role": "user", "content": "x"}]}},
            404,
        ),
        ("post", "/v1/chat/completions", {"json": {"model": "chat", "messages": []}}, 400),
        ("post", "/v1/chat/completions", {"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400),
        ("post", "/v1/completions", {"data": "x", "headers": {"Content-Type": "text/plain"}}, 415),
        ("post", "/v1/embeddings", {"json": {"model": "chat", "input": "x"}}, 400),
        ("post", "/v1/audio/transcriptions", {"json": {"model": "stt"}}, 415),
        ("get", "/v1/models/nope", {}, 404),
    ],
)
async def test_error_responses_conform(
    daemon: TestClient, method: str, path: str, kwargs: dict[str, Any], status: int
) -> None:
    spec = Conformance(await document_of(daemon))
    response = await getattr(daemon, method)(path, **kwargs)
    assert response.status == status
    template = path if path in spec.document["paths"] else "/v1/models/{model}"
    spec.check_response(template, method, status, await response.json())
