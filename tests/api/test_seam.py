"""The seam between the API and the engines: admission, engine declarations, and an engine from the
test tree served over HTTP with no production file knowing it."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient

from lllmsd.api.keys import RUNTIME
from lllmsd.app import create_app
from lllmsd.config import ConfigError, parse_config
from lllmsd.core.jobs import ModelTask
from lllmsd.engines.fake import FakeEngine
from tests.api.probe import eventually
from tests.api.toy_engine import ToyEngine, toy_engines
from tests.conftest import AppFactory, fake_model, make_config, sdk
from tests.setup_models import model_path


def toy_config(**options: Any) -> Any:
    models = {
        "toy": {"task": "text-completion", "engine": "toy", **options},
        "emb": {"task": "embedding", "engine": "fake"},
    }
    return parse_config({"models": models}, engines=toy_engines())


@pytest.fixture
async def toy(aiohttp_client: Any) -> TestClient:
    return await aiohttp_client(create_app(toy_config(shout=True), engines=toy_engines(), reap_interval=None))


async def post(client: TestClient, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    response = await client.post(path, json=body)
    return response.status, await response.json()


# ------------------------------------------------------------------------------------ a new engine


async def test_an_engine_from_the_test_tree_serves_chat_and_completions_over_http(toy: TestClient) -> None:
    status, body = await post(toy, "/v1/completions", {"model": "toy", "prompt": "stressed"})
    assert status == 200, body
    assert body["choices"][0]["text"] == "DESSERTS"
    async with sdk(toy) as api:
        reply = await api.chat.completions.create(model="toy", messages=[{"role": "user", "content": "live"}])
        assert reply.choices[0].message.content == "EVIL"
        stream = await api.chat.completions.create(
            model="toy", messages=[{"role": "user", "content": "abc"}], stream=True, seed=7
        )
        pieces = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]
    assert "".join(p for p in pieces if p) == "CBA"


async def test_its_config_class_and_its_own_checks_apply(toy: TestClient) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config({"models": {"t": {"task": "text-completion", "engine": "toy", "loud": 1}}}, engines=toy_engines())
    assert "models.t.loud: unknown key" in error.value.lines()
    with pytest.raises(ConfigError) as error:
        toy_config(context_size=64)
    assert "models.toy.context_size: the toy engine has no context to size" in error.value.lines()
    with pytest.raises(ConfigError) as error:
        parse_config({"models": {"t": {"task": "embedding", "engine": "toy"}}}, engines=toy_engines())
    assert error.value.lines() == ["models.t.task: the toy engine cannot do embedding (it does: text-completion)"]
    # check_job runs before the request queues
    status, body = await post(toy, "/v1/completions", {"model": "toy", "prompt": ""})
    assert (status, body["error"]["param"]) == (400, "prompt")


async def test_undeclared_features_are_refused_naming_the_parameter(toy: TestClient) -> None:
    cases = [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logit_bias": {"5": 1}}, "logit_bias"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ]
    for extra, param in cases:
        status, body = await post(
            toy, "/v1/chat/completions", {"model": "toy", "messages": [{"role": "user", "content": "x"}], **extra}
        )
        assert status == 400, extra
        assert body["error"]["code"] == "unsupported_parameter"
        assert body["error"]["param"] == param
        assert "toy engine" in body["error"]["message"]
    assert toy.server.app[RUNTIME].pools["toy"].instances == []  # nothing loaded for refused requests


async def test_get_status_shows_each_models_declaration(toy: TestClient) -> None:
    models = (await (await toy.get("/")).json())["models"]
    assert models["toy"]["serves"] == ["chat", "completion"]
    assert models["toy"]["features"] == ["seed"]
    # the fake serves every kind; this model takes embeddings, and rerank requests answered by cosine
    assert models["emb"]["serves"] == ["embedding", "rerank"]
    assert set(models["emb"]["features"]) == {f.value for f in FakeEngine.features}
    assert ToyEngine.tasks() == {ModelTask.TEXT_COMPLETION}


# ---------------------------------------------------------------------------- requests a model's task
# cannot serve: one error type and code, whatever the route


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/embeddings", {"model": "toy", "input": "x"}),
        ("/v1/chat/completions", {"model": "emb", "messages": [{"role": "user", "content": "x"}]}),
        ("/v1/completions", {"model": "emb", "prompt": "x"}),
    ],
)
async def test_a_request_the_models_task_cannot_serve_is_one_error(toy: TestClient, path: str, body: Any) -> None:
    status, answer = await post(toy, path, body)
    assert status == 400
    assert answer["error"]["code"] == "unsupported_task"
    assert answer["error"]["param"] == "model"
    assert "cannot serve" in answer["error"]["message"]


async def test_transcription_to_a_text_model_is_the_same_error(toy: TestClient) -> None:
    form = {"model": "toy", "file": ("a.wav", b"\0" * 100)}
    async with sdk(toy) as api:
        with pytest.raises(openai.BadRequestError) as error:
            await api.audio.transcriptions.create(model=form["model"], file=form["file"])
    assert error.value.code == "unsupported_task"


async def test_gpt4all_refuses_what_it_cannot_serve_before_loading(start_app: AppFactory) -> None:
    """gpt4all serves chat and completions with no optional feature: everything else is refused at once."""
    model = {"task": "text-completion", "engine": "gpt4all", "location": str(model_path("smollm2-gpt4all"))}
    client = await start_app(make_config({"g": model}))
    status, body = await post(client, "/v1/embeddings", {"model": "g", "input": "x"})
    assert (status, body["error"]["code"]) == (400, "unsupported_task")
    for extra, param in [({"n": 2}, "n"), ({"seed": 3}, "seed"), ({"logprobs": True}, "logprobs")]:
        status, body = await post(
            client, "/v1/chat/completions", {"model": "g", "messages": [{"role": "user", "content": "x"}], **extra}
        )
        assert (status, body["error"]["param"]) == (400, param)
    status, body = await post(client, "/v1/completions", {"model": "g", "prompt": "x", "echo": True})
    assert (status, body["error"]["param"]) == (400, "echo")
    assert client.server.app[RUNTIME].pools["g"].instances == []


# ------------------------------------------------------------------------- the global concurrency slot


async def test_an_instance_is_busy_only_while_it_runs(start_app: AppFactory) -> None:
    """With one global slot taken by model a, model b's request waits without holding b's instance."""
    config = make_config(
        {"a": fake_model(token_delay=0.02, min_instances=1), "b": fake_model(min_instances=1)}, concurrency=1
    )
    client = await start_app(config)
    runtime = client.server.app[RUNTIME]
    await eventually(lambda: all(p.instances and p.instances[0].state.value == "idle" for p in runtime.pools.values()))
    long = asyncio.ensure_future(post(client, "/v1/completions", {"model": "a", "prompt": " ".join(["w"] * 50)}))
    await eventually(lambda: runtime.limiter.in_use == 1)
    short = asyncio.ensure_future(post(client, "/v1/completions", {"model": "b", "prompt": "hi"}))
    await eventually(lambda: runtime.pools["b"].waiting == 1)
    assert [i.state.value for i in runtime.pools["b"].instances] == ["idle"]  # queued, not reserved
    status = await (await client.get("/")).json()
    assert status["models"]["b"]["waiting"] == 1
    assert status["models"]["b"]["state"] == "ready"
    assert (await long)[0] == 200
    assert (await short)[0] == 200
    assert runtime.limiter.in_use == 0
