"""Rerank on real engines, over HTTP: all-MiniLM-L6-v2 ranking by cosine on torch and on onnxruntime, the
CrossEncoder path on a small random BERT cross-encoder the tests build (tests/setup_models.py), and the
llama-cpp rank-pooling path on the same weights written as a GGUF reranker.

No PyPI package ships cross-encoder weights, so the cross-encoder tests check what a random model can
show: the scores are the library's own (``CrossEncoder.predict``) for the same pairs, results are sorted
by them, batching does not change them, and lengths are counted, cut or refused. Ranking quality is shown
on the bi-encoder path, with the packaged MiniLM.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from lllmsd.api.schemas.bodies import RerankResponse
from lllmsd.config import ConfigError, parse_config
from tests.api.fuzzing import DaemonThread
from tests.engines.conftest import EMBEDDING_MODELS
from tests.setup_models import model_path

pytestmark = pytest.mark.engines

QUERY = "What is the capital of France?"
# listed worst first, so a ranking that kept the request's order would fail
DOCUMENTS = ["The cat sat on the mat.", "France is in Europe.", "Paris is the capital of France."]
PASSAGES = [
    "The Eiffel Tower was finished in 1889.",
    "Bananas are rich in potassium.",
    "A tokenizer splits text into pieces the model knows.",
    "The Seine flows through Paris.",
    "Interest rates rose again this quarter.",
    "Lyon is the third largest city in France.",
    "Cross-encoders read the query and the document together.",
]


def gguf_model(**options: Any) -> dict[str, Any]:
    return {
        "task": "rerank",
        "engine": "llama-cpp",
        "location": str(model_path("cross-encoder-gguf")),
        "device": {"threads": 1, "batch_threads": 1},
        **options,
    }


def cross_encoder_model(**options: Any) -> dict[str, Any]:
    return {
        "task": "rerank",
        "engine": "sentence-transformers",
        "location": str(model_path("cross-encoder")),
        "device": {"threads": 1},
        **options,
    }


@pytest.fixture(scope="module")
def reference() -> Any:
    """The library itself on the same folder: what the engine must agree with."""
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(model_path("cross-encoder")), device="cpu", local_files_only=True)


@pytest.fixture(scope="module")
def daemon() -> Iterator[Client]:
    """One daemon for the module (each model loads once, in its worker process)."""
    config = parse_config(
        {
            "models": {
                "minilm": {**EMBEDDING_MODELS["st-torch"](), "device": {"threads": 1}},
                "minilm-onnx": {**EMBEDDING_MODELS["st-onnx"](), "device": {"threads": 1}, "truncate": False},
                "ce": cross_encoder_model(),
                "ce-small-batches": cross_encoder_model(max_batch_size=2),
                "ce-strict": cross_encoder_model(truncate=False),
                "gguf": gguf_model(),
                "gguf-strict": gguf_model(truncate=False),
            },
            "shutdown_grace": 5,  # torch workers can be slow to exit on a busy machine: do not wait 30 s
        }
    )
    with DaemonThread(config) as thread:
        yield Client(thread.url)


class Client:
    def __init__(self, url: str) -> None:
        self.url = url

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        response = requests.post(f"{self.url}{path}", json=body, timeout=300)
        return response.status_code, response.json()


def rerank(daemon: Client, body: dict[str, Any], path: str = "/v1/rerank") -> dict[str, Any]:
    status, answer = daemon.post(path, body)
    assert status == 200, answer
    RerankResponse.model_validate(answer)
    return answer


# ------------------------------------------------------------------------------ bi-encoder: MiniLM


@pytest.mark.parametrize("model", ["minilm", "minilm-onnx"])
def test_minilm_ranks_the_answer_first_by_cosine(daemon: Client, model: str) -> None:
    body = rerank(daemon, {"model": model, "query": QUERY, "documents": DOCUMENTS})
    assert [r["index"] for r in body["results"]] == [2, 1, 0]
    scores = [r["relevance_score"] for r in body["results"]]
    # measured with sentence-transformers: 0.856, 0.682, -0.022 (torch and int8 onnx agree to 0.002)
    assert scores == pytest.approx([0.856, 0.682, -0.022], abs=0.01)
    assert [r["document"]["text"] for r in body["results"]] == [DOCUMENTS[2], DOCUMENTS[1], DOCUMENTS[0]]
    assert body["usage"]["total_tokens"] > len(QUERY.split()) + sum(len(d.split()) for d in DOCUMENTS)


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank"])
def test_minilm_top_n_and_return_documents(daemon: Client, path: str) -> None:
    body = rerank(
        daemon,
        {"model": "minilm", "query": QUERY, "documents": DOCUMENTS + PASSAGES, "top_n": 2, "return_documents": False},
        path,
    )
    assert [r["index"] for r in body["results"]] == [2, 1]
    assert all("document" not in r for r in body["results"])


def test_minilm_agrees_with_its_own_embeddings(daemon: Client) -> None:
    documents = DOCUMENTS + PASSAGES
    _, embedded = daemon.post("/v1/embeddings", {"model": "minilm", "input": [QUERY, *documents]})
    vectors = np.asarray([d["embedding"] for d in embedded["data"]])
    expected = vectors[1:] @ vectors[0] / np.linalg.norm(vectors[1:], axis=1) / np.linalg.norm(vectors[0])
    body = rerank(daemon, {"model": "minilm", "query": QUERY, "documents": documents})
    got = {r["index"]: r["relevance_score"] for r in body["results"]}
    np.testing.assert_allclose([got[i] for i in range(len(documents))], expected, atol=1e-5)


def test_a_too_long_document_on_an_embedding_model_without_truncate_is_400(daemon: Client) -> None:
    documents = ["Paris.", "word " * 300]  # MiniLM reads 256 tokens
    status, answer = daemon.post("/v1/rerank", {"model": "minilm-onnx", "query": QUERY, "documents": documents})
    error = answer["error"]
    assert status == 400
    assert error["param"] == "documents"
    assert error["code"] == "context_length_exceeded"
    assert error["message"].startswith("documents[1] is 302 tokens long"), error["message"]
    # and the truncating model reads the first 256
    body = rerank(daemon, {"model": "minilm", "query": QUERY, "documents": documents})
    assert len(body["results"]) == 2


# ---------------------------------------------------------------------------- cross-encoder: random BERT


def test_cross_encoder_scores_are_the_librarys_and_sorted(daemon: Client, reference: Any) -> None:
    body = rerank(daemon, {"model": "ce", "query": QUERY, "documents": PASSAGES})
    expected = reference.predict([(QUERY, p) for p in PASSAGES])
    assert len(body["results"]) == len(PASSAGES)
    assert sorted(r["index"] for r in body["results"]) == list(range(len(PASSAGES)))
    scores = [r["relevance_score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    got = {r["index"]: r["relevance_score"] for r in body["results"]}
    np.testing.assert_allclose([got[i] for i in range(len(PASSAGES))], expected, atol=1e-5)
    assert len(set(np.round(expected, 4))) > 1  # the random model does tell the passages apart
    assert [r["index"] for r in body["results"]] == list(np.argsort(-expected, kind="stable"))
    pairs = reference.tokenizer([QUERY] * len(PASSAGES), PASSAGES)["input_ids"]
    assert body["usage"]["total_tokens"] == sum(len(ids) for ids in pairs)


def test_cross_encoder_batches_of_two_give_the_same_scores(daemon: Client) -> None:
    documents = PASSAGES * 3  # 21 pairs: 11 forward passes of at most 2
    whole = rerank(daemon, {"model": "ce", "query": QUERY, "documents": documents})
    small = rerank(daemon, {"model": "ce-small-batches", "query": QUERY, "documents": documents})
    by_index = [{r["index"]: r["relevance_score"] for r in b["results"]} for b in (whole, small)]
    np.testing.assert_allclose([by_index[0][i] for i in range(21)], [by_index[1][i] for i in range(21)], atol=1e-5)
    assert len(small["results"]) == 21


def test_cross_encoder_cuts_or_refuses_a_pair_longer_than_it_reads(daemon: Client, reference: Any) -> None:
    documents = ["Paris.", "word " * 200]  # the random model reads 128 tokens
    status, answer = daemon.post("/v1/rerank", {"model": "ce-strict", "query": QUERY, "documents": documents})
    error = answer["error"]
    assert status == 400
    assert (error["param"], error["code"]) == ("documents", "context_length_exceeded")
    length = len(reference.tokenizer(QUERY, documents[1])["input_ids"])
    assert length > 128
    assert error["message"].startswith(f"documents[1] is {length} tokens long together with the query"), error[
        "message"
    ]
    body = rerank(daemon, {"model": "ce", "query": QUERY, "documents": documents})
    got = {r["index"]: r["relevance_score"] for r in body["results"]}
    expected = reference.predict([(QUERY, d) for d in documents])  # the library truncates the same way
    np.testing.assert_allclose([got[0], got[1]], expected, atol=1e-5)
    short = len(reference.tokenizer(QUERY, documents[0])["input_ids"])
    assert body["usage"]["total_tokens"] == short + 128


def test_a_cross_encoder_serves_no_embeddings(daemon: Client) -> None:
    status, answer = daemon.post("/v1/embeddings", {"model": "ce", "input": "hello"})
    assert status == 400
    assert answer["error"]["code"] == "unsupported_task"


# ------------------------------------------------------------------- llama-cpp: rank pooling on a GGUF


def test_gguf_rank_pooling_scores_what_the_cross_encoder_scores(daemon: Client, reference: Any) -> None:
    # the same random weights: llama.cpp's BERT with rank pooling and sentence-transformers agree
    body = rerank(daemon, {"model": "gguf", "query": QUERY, "documents": PASSAGES})
    expected = reference.predict([(QUERY, p) for p in PASSAGES])
    got = {r["index"]: r["relevance_score"] for r in body["results"]}
    np.testing.assert_allclose([got[i] for i in range(len(PASSAGES))], expected, atol=1e-3)
    scores = [r["relevance_score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    # [CLS] query [SEP] document [SEP], as transformers' tokenizer makes a pair
    pairs = reference.tokenizer([QUERY] * len(PASSAGES), PASSAGES)["input_ids"]
    assert body["usage"]["total_tokens"] == sum(len(ids) for ids in pairs)


def test_gguf_pairs_packed_into_batches_score_as_alone(daemon: Client) -> None:
    documents = PASSAGES * 3  # 21 pairs of ~20 tokens: several batches of the 128-token context
    together = rerank(daemon, {"model": "gguf", "query": QUERY, "documents": documents})
    got = {r["index"]: r["relevance_score"] for r in together["results"]}
    alone = [rerank(daemon, {"model": "gguf", "query": QUERY, "documents": [p]})["results"][0] for p in PASSAGES]
    np.testing.assert_allclose([got[i] for i in range(21)], [a["relevance_score"] for a in alone] * 3, atol=1e-5)


def test_gguf_cuts_or_refuses_a_pair_longer_than_its_context(daemon: Client, reference: Any) -> None:
    documents = ["Paris.", "word " * 200]  # the GGUF was trained on 128 positions
    status, answer = daemon.post("/v1/rerank", {"model": "gguf-strict", "query": QUERY, "documents": documents})
    assert status == 400
    assert (answer["error"]["param"], answer["error"]["code"]) == ("documents", "context_length_exceeded")
    length = len(reference.tokenizer(QUERY, documents[1])["input_ids"])
    assert answer["error"]["message"].startswith(f"documents[1] is {length} tokens long together with the query")
    body = rerank(daemon, {"model": "gguf", "query": QUERY, "documents": documents})
    got = {r["index"]: r["relevance_score"] for r in body["results"]}
    expected = reference.predict([(QUERY, d) for d in documents])  # the query is short: both cut the document
    np.testing.assert_allclose([got[0], got[1]], expected, atol=1e-3)


def test_a_cross_encoder_on_the_onnx_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"models\.ce\.backend: rerank models \(CrossEncoder\) run on torch only"):
        parse_config({"models": {"ce": cross_encoder_model(backend="onnx")}})


def test_a_classifier_with_two_labels_is_refused_at_load(tmp_path: Path) -> None:
    import shutil

    from transformers import BertConfig, BertForSequenceClassification

    from lllmsd.engines.base import ModelFiles
    from lllmsd.engines.sentence_transformers_rerank import SentenceTransformersCrossEncoder
    from lllmsd.errors import ModelUnavailable

    source = model_path("cross-encoder")
    tiny = BertConfig.from_pretrained(source)
    tiny.num_labels = 2  # an NLI-style classifier: no single relevance score
    BertForSequenceClassification(tiny).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copyfile(source / name, tmp_path / name)
    model = parse_config({"models": {"ce": cross_encoder_model(location=str(tmp_path))}}).models["ce"]
    with pytest.raises(ModelUnavailable, match="2 labels, not a reranker"):
        SentenceTransformersCrossEncoder(model, ModelFiles(tmp_path))
