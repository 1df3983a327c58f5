"""Rerank's pure logic: which models serve it, how an embedding model's answer is built and scored, and
how the response is ordered."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from lllmsd.api.schemas.rerank import RerankRequest, rerank_response
from lllmsd.core.admission import serves
from lllmsd.core.jobs import EmbeddingJob, EmbeddingResult, JobKind, ModelTask, RerankJob, RerankResult
from lllmsd.core.rerank import cosine_scores, embedding_job, rerank_by_cosine
from lllmsd.engines.fake import FakeEngine
from lllmsd.engines.sentence_transformers import SentenceTransformersEngine
from tests.conftest import make_config


def config(**model: Any) -> Any:
    return make_config({"m": {"engine": "fake", **model}}).models["m"]


def test_rerank_is_answered_through_embeddings_on_embedding_models_only() -> None:
    assert JobKind.RERANK.task is ModelTask.RERANK
    assert JobKind.RERANK.answered_through(ModelTask.EMBEDDING) is JobKind.EMBEDDING
    assert JobKind.RERANK.answered_through(ModelTask.TEXT_COMPLETION) is None
    assert JobKind.EMBEDDING.answered_through(ModelTask.RERANK) is None


def test_which_models_serve_rerank() -> None:
    assert serves(config(task="rerank"), FakeEngine, JobKind.RERANK)
    assert serves(config(task="embedding"), FakeEngine, JobKind.RERANK)
    assert not serves(config(task="embedding", rerank_by_cosine=False), FakeEngine, JobKind.RERANK)
    assert not serves(config(task="text-completion"), FakeEngine, JobKind.RERANK)
    assert not serves(config(task="rerank"), FakeEngine, JobKind.EMBEDDING)
    # the real embedding engine has no rerank method: core answers for it
    assert JobKind.RERANK not in SentenceTransformersEngine.serves
    assert serves(config(task="embedding"), SentenceTransformersEngine, JobKind.RERANK)


def test_an_embedding_job_for_rerank_names_its_inputs_as_the_request_did() -> None:
    job = embedding_job(RerankJob(query="q", documents=("a", "b")))
    assert job.inputs == ("q", "a", "b")
    assert [job.name_of(i) for i in range(3)] == [
        ("query", "query"),
        ("documents[0]", "documents"),
        ("documents[1]", "documents"),
    ]
    assert EmbeddingJob(inputs=("x", "y")).name_of(1) == ("input[1]", "input")


def test_cosine_scores_normalise_the_vectors() -> None:
    vectors = np.array([[2.0, 0.0], [3.0, 0.0], [0.0, 5.0], [-1.0, 1.0], [0.0, 0.0]])
    np.testing.assert_allclose(cosine_scores(vectors), [1.0, 0.0, -np.sqrt(0.5), 0.0], atol=1e-12)


async def test_rerank_by_cosine_sums_every_inputs_tokens() -> None:
    seen: list[EmbeddingJob] = []

    async def embed(job: EmbeddingJob) -> EmbeddingResult:
        seen.append(job)
        return EmbeddingResult(vectors=[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], token_counts=[3, 4, 5])

    result = await rerank_by_cosine(embed, RerankJob(query="q", documents=("a", "b")))
    assert seen[0].inputs == ("q", "a", "b")
    assert result.scores == pytest.approx([0.0, np.sqrt(0.5)])
    assert result.total_tokens == 12


def test_the_response_is_sorted_stable_and_cut_to_top_n() -> None:
    body = RerankRequest(model="m", query="q", documents=["a", "b", "c", "d"], top_n=3)
    answer = rerank_response(body, RerankResult(scores=[0.1, 0.5, 0.1, 0.9], total_tokens=8))
    assert [r["index"] for r in answer["results"]] == [3, 1, 0]
    assert [r["document"]["text"] for r in answer["results"]] == ["d", "b", "a"]
    assert answer["usage"] == {"total_tokens": 8}


def test_document_objects_become_their_text() -> None:
    body = RerankRequest.model_validate({"model": "m", "query": "q", "documents": [{"text": "a"}, "b"]})
    assert body.documents == ["a", "b"]
    assert body.to_job(config(task="rerank")) == RerankJob(query="q", documents=("a", "b"))


def test_rerank_options_go_with_the_models_that_rank() -> None:
    from lllmsd.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as error:
        parse_config(
            {
                "models": {
                    "chat": {"task": "text-completion", "engine": "fake", "max_rerank_documents": 5},
                    "rr": {"task": "rerank", "engine": "fake", "rerank_by_cosine": False, "batch_window_ms": 5},
                }
            }
        )
    assert error.value.problems == [
        ("models.chat.max_rerank_documents", "only embedding and rerank models take this option"),
        ("models.rr.batch_window_ms", "only embedding models take this option"),
        ("models.rr.rerank_by_cosine", "only embedding models take this option"),
    ]
    rr = parse_config({"models": {"rr": {"task": "rerank", "engine": "fake", "max_batch_size": 4, "truncate": False}}})
    assert rr.models["rr"].max_rerank_documents == 1000
    assert rr.models["rr"].request_seconds() == 120
