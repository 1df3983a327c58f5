"""POST /v1/rerank (and /rerank, /v2/rerank) end to end on the FakeEngine, through raw HTTP.

Two paths: a model configured with ``task: rerank`` runs the engine's own rerank (the fake scores each
document by the share of the query's words it contains), and an embedding model answers by the cosine
similarity of its embeddings (the fake's are hashed unit vectors, so the expected scores are computed
from the same function here, never written down). Ranking quality on a real model is in
tests/engines/test_rerank.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient

from lllmsd.api.keys import RUNTIME
from lllmsd.api.schemas.bodies import RerankResponse
from lllmsd.core.jobs import RerankJob, RerankResult
from lllmsd.engines.fake import FakeEngine
from tests.conftest import AppFactory, fake_model, make_config

PATHS = ["/v1/rerank", "/openai/v1/rerank", "/rerank", "/v2/rerank"]
DIMS = 24
QUERY = "What is the capital of France?"
DOCUMENTS = ["The cat sat on the mat.", "France is in Europe.", "Paris is the capital of France."]


def rerank_model(**options: Any) -> dict[str, Any]:
    return {"task": "rerank", "engine": "fake", **options}


def embedding_model(**options: Any) -> dict[str, Any]:
    return {"task": "embedding", "engine": "fake", "dimensions": DIMS, **options}


def cosine(query: str, document: str) -> float:
    a = np.asarray(FakeEngine._vector(query, DIMS))
    b = np.asarray(FakeEngine._vector(document, DIMS))
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture
async def client(start_app: AppFactory) -> TestClient:
    config = make_config(
        {
            "rr": rerank_model(max_rerank_documents=5),
            "strict": rerank_model(truncate=False, context_size=16),
            "emb": embedding_model(),
            "emb-off": embedding_model(rerank_by_cosine=False),
            "chat": fake_model(),
        }
    )
    return await start_app(config)


async def post(client: TestClient, body: dict[str, Any], path: str = "/v1/rerank") -> tuple[int, dict[str, Any]]:
    response = await client.post(path, json=body)
    return response.status, await response.json()


def assert_error(status: int, body: dict[str, Any], param: str | None, *words: str, code: int = 400) -> None:
    assert status == code, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error["message"]


# --------------------------------------------------------------------------------------- rerank model


@pytest.mark.parametrize("path", PATHS)
async def test_a_rerank_model_ranks_by_its_scores_at_every_path(client: TestClient, path: str) -> None:
    status, body = await post(client, {"model": "rr", "query": QUERY, "documents": DOCUMENTS}, path)
    assert status == 200, body
    RerankResponse.model_validate(body)
    # the fake scores the share of the query's 6 words each document holds: 5/6, 2/6 ("is", "France"), 1/6
    assert [r["index"] for r in body["results"]] == [2, 1, 0]
    assert [r["relevance_score"] for r in body["results"]] == pytest.approx([5 / 6, 2 / 6, 1 / 6])
    assert [r["document"]["text"] for r in body["results"]] == [DOCUMENTS[2], DOCUMENTS[1], DOCUMENTS[0]]
    assert body["model"] == "rr"
    assert body["id"].startswith("rerank-")
    assert body["usage"]["total_tokens"] == sum(6 + len(d.split()) for d in DOCUMENTS)  # the fake counts words


async def test_top_n_keeps_the_best_and_a_larger_one_keeps_all(client: TestClient) -> None:
    status, body = await post(client, {"model": "rr", "query": QUERY, "documents": DOCUMENTS, "top_n": 1})
    assert status == 200, body
    assert [r["index"] for r in body["results"]] == [2]
    status, body = await post(client, {"model": "rr", "query": QUERY, "documents": DOCUMENTS, "top_n": 10})
    assert [r["index"] for r in body["results"]] == [2, 1, 0]


async def test_return_documents_false_leaves_the_text_out(client: TestClient) -> None:
    status, body = await post(
        client, {"model": "rr", "query": QUERY, "documents": DOCUMENTS, "return_documents": False}
    )
    assert status == 200, body
    assert all(set(r) == {"index", "relevance_score"} for r in body["results"])
    RerankResponse.model_validate(body)


async def test_documents_may_be_objects_with_text(client: TestClient) -> None:
    objects = [{"text": d} for d in DOCUMENTS]
    status, body = await post(client, {"model": "rr", "query": QUERY, "documents": objects})
    assert status == 200, body
    assert [r["index"] for r in body["results"]] == [2, 1, 0]
    assert body["results"][0]["document"] == {"text": DOCUMENTS[2]}


async def test_equal_scores_keep_the_documents_order(client: TestClient) -> None:
    documents = ["nothing here", "capital", "none", "France capital", "capital too"]
    status, body = await post(client, {"model": "rr", "query": QUERY, "documents": documents})
    assert status == 200, body
    assert [r["index"] for r in body["results"]] == [3, 1, 4, 0, 2]


async def test_a_too_long_document_is_cut_when_truncate_is_on(client: TestClient) -> None:
    long = " ".join(["word"] * 5000)  # the fake's context is 4096 words
    status, body = await post(client, {"model": "rr", "query": QUERY, "documents": ["Paris", long]})
    assert status == 200, body
    assert body["usage"]["total_tokens"] == (6 + 1) + 4096


# ----------------------------------------------------------------------------------- embedding model


@pytest.mark.parametrize("path", PATHS)
async def test_an_embedding_model_ranks_by_cosine_similarity(client: TestClient, path: str) -> None:
    status, body = await post(client, {"model": "emb", "query": QUERY, "documents": DOCUMENTS}, path)
    assert status == 200, body
    RerankResponse.model_validate(body)
    expected = [cosine(QUERY, d) for d in DOCUMENTS]
    order = sorted(range(3), key=lambda i: -expected[i])
    assert [r["index"] for r in body["results"]] == order
    assert [r["relevance_score"] for r in body["results"]] == pytest.approx([expected[i] for i in order], abs=1e-6)
    assert body["usage"]["total_tokens"] == 6 + sum(len(d.split()) for d in DOCUMENTS)


async def test_status_says_which_models_serve_rerank(client: TestClient) -> None:
    models = (await (await client.get("/")).json())["models"]
    assert models["emb"]["serves"] == ["embedding", "rerank"]
    assert models["emb-off"]["serves"] == ["embedding"]
    assert models["rr"]["serves"] == ["rerank"]
    assert "rerank" not in models["chat"]["serves"]


async def test_rerank_and_embedding_requests_share_the_embedding_batches(start_app: AppFactory) -> None:
    # batches of 8 inputs fill up before the (long) window ends: two reranks of 1 query + 3 documents,
    # or a rerank and an embedding request of 4 inputs, are one engine call each time
    client = await start_app(make_config({"emb": embedding_model(max_batch_size=8, batch_window_ms=1000)}))
    batcher = client.server.app[RUNTIME].pools["emb"].batcher
    request = {"model": "emb", "query": QUERY, "documents": DOCUMENTS}
    answers = await asyncio.gather(post(client, request), post(client, {**request, "query": "Where is Paris?"}))
    assert batcher.batches_run == 1
    assert [status for status, _ in answers] == [200, 200]
    for (_, body), query in zip(answers, [QUERY, "Where is Paris?"], strict=True):
        scores = {r["index"]: r["relevance_score"] for r in body["results"]}
        assert [scores[i] for i in range(3)] == pytest.approx([cosine(query, d) for d in DOCUMENTS], abs=1e-6)
    texts = ["one", "two", "three", "four"]
    (status, body), embedded = await asyncio.gather(
        post(client, request), client.post("/v1/embeddings", json={"model": "emb", "input": texts})
    )
    assert status == 200
    assert embedded.status == 200
    assert len((await embedded.json())["data"]) == 4
    assert batcher.batches_run == 2


async def test_a_long_list_on_an_embedding_model_is_one_request_in_batches(start_app: AppFactory) -> None:
    client = await start_app(make_config({"emb": embedding_model(max_batch_size=8)}))
    documents = [f"document number {i}" for i in range(100)]
    status, body = await post(client, {"model": "emb", "query": QUERY, "documents": documents, "top_n": 5})
    assert status == 200, body
    expected = sorted(((cosine(QUERY, d), i) for i, d in enumerate(documents)), key=lambda p: -p[0])[:5]
    assert [r["index"] for r in body["results"]] == [i for _, i in expected]


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("change", "param", "words"),
    [
        ({"query": ""}, "query", ["empty"]),
        ({"query": "   "}, "query", ["empty"]),
        ({"query": None}, "query", []),
        ({"documents": []}, "documents", ["empty array"]),
        ({"documents": "Paris"}, "documents", ["array"]),
        ({"documents": ["Paris", ""]}, "documents", ["documents[1]", "empty string"]),
        ({"documents": ["Paris", 7]}, "documents", ["documents[1]"]),
        ({"documents": [{"text": "Paris", "title": "x"}]}, "documents", ["documents[0]", "only a string 'text'"]),
        ({"documents": [{"body": "Paris"}]}, "documents", ["documents[0]"]),
        ({"documents": ["x" * 100_001]}, "documents", ["documents[0]", "100,000"]),
        ({"top_n": 0}, "top_n", ["at least 1"]),
        ({"top_n": -3}, "top_n", ["at least 1"]),
        ({"top_n": "two"}, "top_n", []),
        ({"return_documents": "maybe"}, "return_documents", []),
        ({"max_chunks_per_doc": 2}, "max_chunks_per_doc", []),
    ],
)
async def test_bad_requests_are_400_naming_the_parameter(
    client: TestClient, change: dict[str, Any], param: str, words: list[str]
) -> None:
    request = {"model": "rr", "query": QUERY, "documents": DOCUMENTS, **change}
    status, body = await post(client, request)
    assert_error(status, body, param, *words)


@pytest.mark.parametrize("model", ["rr", "emb"])
async def test_more_documents_than_the_model_takes_is_400(client: TestClient, model: str) -> None:
    limit = 5 if model == "rr" else 1000  # configured, and the default
    status, body = await post(client, {"model": model, "query": QUERY, "documents": ["doc"] * (limit + 1)})
    assert_error(status, body, "documents", f"at most {limit}", "max_rerank_documents")
    assert body["error"]["code"] == "invalid_value"
    status, body = await post(client, {"model": model, "query": QUERY, "documents": ["doc"] * limit})
    assert status == 200, body


async def test_a_too_long_document_without_truncate_is_400_naming_its_index(client: TestClient) -> None:
    documents = ["Paris", "a b c d e f g h i j k l"]  # 6 query words + 12: over the context of 16
    status, body = await post(client, {"model": "strict", "query": QUERY, "documents": documents})
    assert_error(status, body, "documents", "documents[1]", "18 tokens", "truncate is off")
    assert body["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    ("model", "words"), [("chat", ["text-completion", "rerank"]), ("emb-off", ["rerank_by_cosine"])]
)
async def test_a_model_that_cannot_rerank_is_400(client: TestClient, model: str, words: list[str]) -> None:
    status, body = await post(client, {"model": model, "query": QUERY, "documents": DOCUMENTS})
    assert_error(status, body, "model", *words)
    assert body["error"]["code"] == "unsupported_task"


async def test_an_unknown_model_is_404(client: TestClient) -> None:
    status, body = await post(client, {"model": "nope", "query": QUERY, "documents": DOCUMENTS})
    assert_error(status, body, "model", "nope", code=404)


async def test_a_rerank_model_refuses_embedding_requests(client: TestClient) -> None:
    response = await client.post("/v1/embeddings", json={"model": "rr", "input": "hello"})
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "unsupported_task"


async def test_an_engine_failure_is_a_clear_error_and_the_model_keeps_serving(start_app: AppFactory) -> None:
    class FailingOnce(FakeEngine):
        failed = False

        def rerank(self, job: RerankJob) -> RerankResult:
            if not FailingOnce.failed:
                FailingOnce.failed = True
                raise RuntimeError("the scorer broke")
            return super().rerank(job)

    client = await start_app(make_config({"rr": rerank_model()}), engines={"fake": FailingOnce})
    status, body = await post(client, {"model": "rr", "query": QUERY, "documents": DOCUMENTS})
    assert_error(status, body, None, "RuntimeError", code=500)
    assert "the scorer broke" not in body["error"]["message"]  # an engine's text goes to the log only
    status, body = await post(client, {"model": "rr", "query": QUERY, "documents": DOCUMENTS})
    assert status == 200, body
    assert [r["index"] for r in body["results"]] == [2, 1, 0]


# ------------------------------------------------------------------------------- a real rerank client


async def test_the_cohere_sdk_reranks_through_v2_rerank(client: TestClient) -> None:
    """Cohere's own client (ClientV2.rerank posts to {base_url}/v2/rerank), unchanged but for its base URL."""
    import cohere

    async with cohere.AsyncClientV2(base_url=str(client.make_url("")).rstrip("/"), api_key="unused") as api:
        answer = await api.rerank(model="rr", query=QUERY, documents=DOCUMENTS, top_n=2)
        assert [r.index for r in answer.results] == [2, 1]
        assert [r.relevance_score for r in answer.results] == pytest.approx([5 / 6, 2 / 6])
        by_cosine = await api.rerank(model="emb", query=QUERY, documents=DOCUMENTS)
        assert [r.relevance_score for r in by_cosine.results] == pytest.approx(
            sorted((cosine(QUERY, d) for d in DOCUMENTS), reverse=True), abs=1e-6
        )
        with pytest.raises(cohere.BadRequestError) as refused:
            await api.rerank(model="rr", query=QUERY, documents=DOCUMENTS, top_n=0)
    assert refused.value.body["error"]["param"] == "top_n"


async def test_an_engine_that_loses_scores_is_a_500_not_wrong_indices(start_app: AppFactory) -> None:
    class Short(FakeEngine):
        def rerank(self, job: RerankJob) -> RerankResult:
            full = super().rerank(job)
            return RerankResult(scores=full.scores[:-1], total_tokens=full.total_tokens)

    client = await start_app(make_config({"rr": rerank_model()}), engines={"fake": Short})
    status, body = await post(client, {"model": "rr", "query": QUERY, "documents": DOCUMENTS})
    assert_error(status, body, None, "2 scores for 3 documents", code=500)
