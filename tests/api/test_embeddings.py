"""POST /v1/embeddings end to end on the FakeEngine, through the official SDK and raw HTTP.

The FakeEngine's vectors are unit vectors hashed from the text (token-id inputs: from the ids joined by
spaces), so every expected vector here is computed from the same function, never written down.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from typing import Any

import numpy as np
import openai
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from lllmsd.api.keys import RUNTIME
from lllmsd.core.jobs import EmbeddingJob, EmbeddingResult
from lllmsd.engines.fake import FakeEngine
from tests.api.probe import GATE_LIMIT, eventually
from tests.conftest import AppFactory, fake_model, make_config, sdk

PREFIXES = ["/v1", "/openai/v1"]
DIMS = 24


def embedding_model(**options: Any) -> dict[str, Any]:
    return {"task": "embedding", "engine": "fake", "dimensions": DIMS, **options}


def expected(text: str, dims: int = DIMS) -> np.ndarray:
    return np.asarray(FakeEngine._vector(text, dims), dtype=np.float32)


@pytest.fixture
async def client(start_app: AppFactory) -> TestClient:
    config = make_config({"emb": embedding_model(max_inputs=5), "chat": fake_model()})
    return await start_app(config)


async def post(client: TestClient, body: dict[str, Any], prefix: str = "/v1") -> tuple[int, dict[str, Any]]:
    response = await client.post(f"{prefix}/embeddings", json=body)
    return response.status, await response.json()


def assert_error(status: int, body: dict[str, Any], code: int, param: str | None, *words: str) -> None:
    assert status == code, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    for word in words:
        assert word in error["message"], error["message"]


# ---------------------------------------------------------------------------------------- the SDK


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_sdk_default_base64_and_float_give_the_same_vectors(client: TestClient, prefix: str) -> None:
    texts = ["the quick brown fox", "jumps over", "the lazy dog"]
    async with sdk(client, prefix) as api:
        default = await api.embeddings.create(model="emb", input=texts)  # the SDK asks for base64
        floats = await api.embeddings.create(model="emb", input=texts, encoding_format="float")
    assert [d.embedding for d in default.data] == [d.embedding for d in floats.data]
    for item, text in zip(floats.data, texts, strict=True):
        np.testing.assert_allclose(item.embedding, expected(text), rtol=1e-6)
    assert [d.index for d in default.data] == [0, 1, 2]
    assert default.model == "emb"
    assert default.object == "list"
    assert default.usage.prompt_tokens == 4 + 2 + 3  # the fake tokenizer counts words
    assert default.usage.total_tokens == default.usage.prompt_tokens


async def test_raw_base64_is_little_endian_float32(client: TestClient) -> None:
    status, body = await post(client, {"model": "emb", "input": "hello there", "encoding_format": "base64"})
    assert status == 200, body
    raw = base64.b64decode(body["data"][0]["embedding"])
    assert len(raw) == 4 * DIMS
    np.testing.assert_array_equal(np.frombuffer(raw, dtype="<f4"), expected("hello there"))
    assert body["data"][0]["object"] == "embedding"
    assert body["usage"] == {"prompt_tokens": 2, "total_tokens": 2}


async def test_dimensions_give_unit_vectors_of_that_length(client: TestClient) -> None:
    async with sdk(client) as api:
        short = await api.embeddings.create(model="emb", input=["alpha", "beta"], dimensions=5)
        short_b64 = await api.embeddings.create(model="emb", input=["alpha", "beta"], dimensions=5)
    for item, text in zip(short.data, ["alpha", "beta"], strict=True):
        vector = np.asarray(item.embedding)
        assert vector.shape == (5,)
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-6)
        cut = expected(text)[:5]
        np.testing.assert_allclose(vector, cut / np.linalg.norm(cut), rtol=1e-6)
    assert [d.embedding for d in short.data] == [d.embedding for d in short_b64.data]


# "a cat sat on the mat" and "hello world" in OpenAI's cl100k_base (what tiktoken gives)
CAT_IDS = [64, 8415, 7731, 389, 279, 5634]
HELLO_IDS = [15339, 1917]


async def test_token_inputs_are_openai_ids_decoded_to_text(client: TestClient) -> None:
    async with sdk(client) as api:
        one = await api.embeddings.create(model="emb", input=CAT_IDS, encoding_format="float")
        many = await api.embeddings.create(model="emb", input=[HELLO_IDS, CAT_IDS[:2]], encoding_format="float")
    assert len(one.data) == 1  # one array of ids is one input
    np.testing.assert_allclose(one.data[0].embedding, expected("a cat sat on the mat"), rtol=1e-6)
    np.testing.assert_allclose(many.data[0].embedding, expected("hello world"), rtol=1e-6)
    np.testing.assert_allclose(many.data[1].embedding, expected("a cat"), rtol=1e-6)
    assert one.usage.prompt_tokens == 6  # the model's own count of the decoded text (the fake counts words)


async def test_an_id_outside_cl100k_names_its_place(client: TestClient) -> None:
    status, body = await post(client, {"model": "emb", "input": [[1, 2], [3, 100_300]]})
    assert_error(status, body, 400, "input[1][1]", "cl100k_base", "token_ids: model")


async def test_token_ids_model_reads_the_models_own_vocabulary(start_app: AppFactory) -> None:
    client = await start_app(make_config({"emb": embedding_model(token_ids="model")}))
    async with sdk(client) as api:
        one = await api.embeddings.create(model="emb", input=[101, 2023, 102], encoding_format="float")
        many = await api.embeddings.create(model="emb", input=[[1, 2], [3]], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, expected("101 2023 102"), rtol=1e-6)
    np.testing.assert_allclose(many.data[0].embedding, expected("1 2"), rtol=1e-6)
    np.testing.assert_allclose(many.data[1].embedding, expected("3"), rtol=1e-6)
    assert one.usage.prompt_tokens == 3
    assert many.usage.prompt_tokens == 3


async def test_without_an_installed_encoding_token_ids_are_a_400_that_says_what_to_change(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from lllmsd.core import openai_tokens

    monkeypatch.setattr(openai_tokens, "candidate_files", lambda: [tmp_path / "missing"])
    openai_tokens.cl100k_decoder.cache_clear()
    try:
        status, body = await post(client, {"model": "emb", "input": CAT_IDS})
    finally:
        openai_tokens.cl100k_decoder.cache_clear()
    assert_error(status, body, 400, "input", "check_embedding_ctx_length=False", "token_ids: model", "pip install")


async def test_32_concurrent_requests_each_get_their_own_vectors_in_4_batches(start_app: AppFactory) -> None:
    # batches of 8 fill up before the (long) window ends, so 32 requests make exactly 4 engine calls;
    # "solo" is the same fake model with batching off, to compare with one-by-one results
    config = make_config(
        {"emb": embedding_model(max_batch_size=8, batch_window_ms=1000), "solo": embedding_model(max_batch_size=1)}
    )
    client = await start_app(config)
    texts = [f"sentence number {i}" for i in range(32)]
    async with sdk(client) as api:
        answers = await asyncio.gather(*(api.embeddings.create(model="emb", input=t) for t in texts))
        alone = [await api.embeddings.create(model="solo", input=t) for t in texts]
    assert [a.data[0].embedding for a in answers] == [a.data[0].embedding for a in alone]
    for answer, text in zip(answers, texts, strict=True):
        np.testing.assert_allclose(answer.data[0].embedding, expected(text), rtol=1e-6)
    runtime = client.server.app[RUNTIME]
    assert runtime.pools["emb"].batcher.batches_run == 4
    assert runtime.pools["solo"].batcher.batches_run == 32


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("", ["empty string"]),
        ([], ["empty array"]),
        (["fine", ""], ["input[1]", "empty string"]),
        ([[1, 2], []], ["input[1]", "empty array"]),
        (["text", 1], ["array of strings"]),
        ([1, "text"], ["array of token ids"]),
        ([True], ["token ids"]),
        ([-1, 5], ["input[0]", "negative"]),
        ([[1], [2, 3.5]], ["input[1][1]", "token id"]),
        ({"text": "x"}, ["a string"]),
        (None, ["a string"]),
    ],
)
async def test_bad_input_is_a_400_naming_the_problem(client: TestClient, value: Any, words: list[str]) -> None:
    status, body = await post(client, {"model": "emb", "input": value})
    assert_error(status, body, 400, "input", *words)


async def test_too_many_inputs(client: TestClient) -> None:
    status, body = await post(client, {"model": "emb", "input": ["x"] * 6})
    assert_error(status, body, 400, "input", "6 items", "at most 5")
    status, _ = await post(client, {"model": "emb", "input": ["x"] * 5})
    assert status == 200


async def test_too_many_dimensions(client: TestClient) -> None:
    for _ in range(2):  # first found after the engine ran, then refused before it runs
        status, body = await post(client, {"model": "emb", "input": "x", "dimensions": DIMS + 1})
        assert_error(status, body, 400, "dimensions", str(DIMS + 1), f"{DIMS} dimensions")


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"model": "emb", "input": "x", "dimensions": 0}, "dimensions", ["greater than or equal to 1"]),
        ({"model": "emb", "input": "x", "encoding_format": "int8"}, "encoding_format", ["float", "base64"]),
        ({"model": "emb", "input": "x", "temperature": 1}, "temperature", ["unrecognized"]),
        ({"input": "x"}, "model", ["required"]),
        ({"model": "emb"}, "input", ["required"]),
    ],
)
async def test_bad_fields(client: TestClient, body: dict[str, Any], param: str, words: list[str]) -> None:
    status, answer = await post(client, body)
    assert_error(status, answer, 400, param, *words)


async def test_a_text_model_cannot_embed_and_an_embedding_model_cannot_chat(client: TestClient) -> None:
    async with sdk(client) as api:
        with pytest.raises(openai.BadRequestError) as refused:
            await api.embeddings.create(model="chat", input="x")
        assert "text-completion model and cannot serve embeddings" in refused.value.message
        with pytest.raises(openai.BadRequestError):
            await api.chat.completions.create(model="emb", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.NotFoundError):
            await api.embeddings.create(model="nope", input="x")


async def test_every_sdk_error_is_a_bad_request(client: TestClient) -> None:
    async with sdk(client) as api:
        for kwargs in ({"input": ""}, {"input": []}, {"input": ["a"] * 6}, {"input": "a", "dimensions": 99}):
            with pytest.raises(openai.BadRequestError):
                await api.embeddings.create(model="emb", **kwargs)


async def test_an_engine_failure_is_a_500_envelope_for_every_caller(start_app: AppFactory) -> None:
    class Broken(FakeEngine):
        def embed(self, task: Any) -> Any:
            raise RuntimeError("the weights are gone")

    client = await start_app(make_config({"emb": embedding_model()}), engines={"fake": Broken})
    answers = await asyncio.gather(*(post(client, {"model": "emb", "input": f"x{i}"}) for i in range(3)))
    for status, body in answers:
        assert_error(status, body, 500, None, "RuntimeError")  # the type only: the text stays in the log
        assert body["error"]["code"] == "engine_error"


# ------------------------------------------------------------------------------------------ the queue


def gated_embedder(gate: threading.Event) -> type[FakeEngine]:
    class Gated(FakeEngine):
        def embed(self, job: EmbeddingJob) -> EmbeddingResult:
            if not gate.wait(GATE_LIMIT):
                raise TimeoutError("embedding gate never opened")
            return super().embed(job)

    return Gated


async def test_requests_queued_for_an_embedding_model_show_in_status_and_metrics(start_app: AppFactory) -> None:
    """The batcher's queue is the pool's: one waiting count per model, whatever the kind."""
    gate = threading.Event()
    config = make_config({"emb": embedding_model(max_batch_size=1, batch_window_ms=0)})
    client = await start_app(config, engines={"fake": gated_embedder(gate)})
    pool = client.server.app[RUNTIME].pools["emb"]
    first = asyncio.ensure_future(post(client, {"model": "emb", "input": "running"}))
    await eventually(lambda: any(i.state.value == "busy" for i in pool.instances))
    queued = [asyncio.ensure_future(post(client, {"model": "emb", "input": f"queued {n}"})) for n in range(3)]
    await eventually(lambda: pool.waiting == 3)
    status = await (await client.get("/")).json()
    assert status["models"]["emb"]["waiting"] == 3
    samples = await metric_samples(client)
    assert samples[("lllmsd_queue_depth", frozenset({("model", "emb")}))] == 3
    gate.set()
    for done in await asyncio.gather(first, *queued):
        assert done[0] == 200
    assert (await (await client.get("/")).json())["models"]["emb"]["waiting"] == 0


async def metric_samples(client: TestClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = await (await client.get("/metrics")).text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
