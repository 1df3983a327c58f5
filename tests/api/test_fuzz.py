"""Property-based fuzzing of every route with schemathesis, from the daemon's own /openapi.json: positive and
negative data, on the FakeEngine and on a real engine (llama-cpp on SmolLM2). No 5xx, no response that
breaks its documented schema, no hang. A bounded number of examples here; `make fuzz` runs many more."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.api.fuzzing import DaemonThread, Finding, fuzz_operation, load_schema, operations
from tests.conftest import fake_model, make_config

FAKE_MODELS = {
    "chat": fake_model(max_instances=2),
    "emb": {"task": "embedding", "engine": "fake"},
    "stt": {"task": "speech-to-text", "engine": "fake"},
    "tts": {"task": "text-to-speech", "engine": "fake"},
    "rr": {"task": "rerank", "engine": "fake"},
}
EXAMPLES = {"POST": 12, "GET": 3, "DELETE": 3}  # per operation and mode: the suite stays well under a minute


def report(findings: list[Finding]) -> str:
    return "\n\n".join(f"[{f.mode}] {f.operation}: {f.error}" for f in findings[:10])


@pytest.fixture(scope="module")
def fake_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonThread]:
    state = tmp_path_factory.mktemp("state")  # where the Responses API stores what it is sent
    with DaemonThread(make_config(FAKE_MODELS, concurrency=4, cache_dir=str(state))) as daemon:
        yield daemon


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_every_route_survives_fuzzing_on_the_fake_engine(fake_daemon: DaemonThread, mode: str) -> None:
    schema = load_schema(fake_daemon.url)
    findings: list[Finding] = []
    fuzzed = 0
    for operation in operations(schema):
        findings += fuzz_operation(
            operation,
            fake_daemon.url,
            mode,
            max_examples=EXAMPLES[operation.method.upper()],
            model_ids=list(FAKE_MODELS),
        )
        fuzzed += 1
    # every route: 13 under each of the two API prefixes, /rerank, /v2/rerank, and /, /health, /ready,
    # /metrics, /openapi.json
    assert fuzzed == 33
    assert not findings, report(findings)
    health = fake_daemon_status(fake_daemon)
    for model_id, model in health["models"].items():
        assert model["waiting"] == 0, model_id
        assert all(i["state"] != "busy" for i in model["instances"]), model_id


def fake_daemon_status(daemon: DaemonThread) -> dict[str, Any]:
    import requests

    return requests.get(f"{daemon.url}/", timeout=10).json()


# ------------------------------------------------------------------------------------- a real engine


def llama_models() -> dict[str, Any]:
    """SmolLM2 on llama-cpp, small and on one thread: fuzzing needs many short answers, not good ones."""
    from tests.setup_models import model_path

    return {
        "smol": {
            "task": "text-completion",
            "engine": "llama-cpp",
            "location": str(model_path("smollm2")),
            "context_size": 256,
            "device": {"threads": 1, "batch_threads": 1},
        }
    }


def small_generation(case: Any) -> None:
    """Real tokens cost real time: keep generated answers short and single (the limits are tested elsewhere).
    And repair what the document cannot express (a message's content is required unless it is the
    assistant's; one prompt), so that positive cases reach the engine instead of stopping at a 400."""
    body = case.body
    if not isinstance(body, dict):
        return
    for message in body.get("messages") or []:
        if isinstance(message, dict) and message.get("content") is None:
            message["content"] = "Hi"
        if isinstance(message, dict) and message.get("role") == "tool" and not message.get("tool_call_id"):
            message["tool_call_id"] = "call_1"
    if isinstance(body.get("prompt"), list) and len(body["prompt"]) != 1:
        body["prompt"] = "Once upon a time"
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and not isinstance(body.get(key), bool) and body[key] > 4:
            body[key] = 4
    for key in ("n", "best_of"):
        if isinstance(body.get(key), int) and not isinstance(body.get(key), bool) and body[key] > 2:
            body[key] = 2
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = 4


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_text_routes_survive_fuzzing_on_llama_cpp(mode: str) -> None:
    with DaemonThread(make_config(llama_models())) as daemon:
        schema = load_schema(daemon.url)
        findings: list[Finding] = []
        for operation in operations(schema, prefixes=("/v1/chat", "/v1/completions")):
            findings += fuzz_operation(
                operation, daemon.url, mode, max_examples=8, model_ids=["smol"], edit=small_generation
            )
        assert not findings, report(findings)
