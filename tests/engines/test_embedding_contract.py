"""The contract every embedding engine keeps, run on each model in ``EMBEDDING_MODELS`` (conftest.py).

Joining: add the model to ``EMBEDDING_MODELS`` and, for what it claims beyond the base contract, an entry
in ``CAPABILITIES`` below; a ``tokenizer`` there (text -> the model's own token ids, special tokens
included) turns on the token-input and usage tests. The base contract: one unit vector per input, in
input order, the same (cosine > SAME) together or alone; ``dimensions`` gives unit vectors of that
length and more than the model has is a 400; token ids outside the vocabulary are a 400; and through the
batcher, 32 concurrent requests each get their own vectors.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from lllmsd.core.admission import check_job
from lllmsd.core.batcher import shorten
from lllmsd.core.clock import SystemClock
from lllmsd.core.instance import ModelInstance
from lllmsd.core.jobs import EmbeddingJob, EmbeddingResult
from lllmsd.core.limit import ConcurrencyLimit
from lllmsd.core.pool import ModelPool
from lllmsd.core.store import ModelStore
from lllmsd.engines.registry import builtin_engines
from lllmsd.errors import InvalidRequest
from tests.engines.conftest import EMBEDDING_MODELS, load_instance, model_config

pytestmark = [pytest.mark.engines, pytest.mark.asyncio(loop_scope="module")]

Tokenizer = Callable[[str], list[int]]


def folder_tokenizer(model: dict[str, Any]) -> Tokenizer:
    """The tokenizer.json of a sentence-transformers folder, read independently of the engine."""
    from tokenizers import Tokenizer as HfTokenizer

    tokenizer = HfTokenizer.from_file(str(Path(model["location"]) / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return lambda text: tokenizer.encode(text).ids


def folder_max_tokens(model: dict[str, Any]) -> int:
    return json.loads((Path(model["location"]) / "sentence_bert_config.json").read_text())["max_seq_length"]


def gguf_tokenizer(model: dict[str, Any]) -> Tokenizer:
    """The GGUF's vocabulary loaded on its own (no weights), tokenizing as llama.cpp does for embeddings."""
    import llama_cpp

    vocab = llama_cpp.Llama(model["location"], vocab_only=True, verbose=False)
    return lambda text: vocab.tokenize(text.encode("utf-8"), add_bos=True, special=True)


@dataclass(frozen=True)
class Capabilities:
    semantic: bool = False  # a real sentence model: paraphrases are closer than unrelated sentences
    tokenizer: Callable[[dict[str, Any]], Tokenizer] | None = None
    max_tokens: Callable[[dict[str, Any]], int] | None = None  # longer inputs are truncated to this
    strict_option: dict[str, Any] | None = None  # config that makes too-long inputs a 400 instead


SENTENCE_TRANSFORMERS = Capabilities(
    semantic=True, tokenizer=folder_tokenizer, max_tokens=folder_max_tokens, strict_option={"truncate": False}
)
CAPABILITIES: dict[str, Capabilities] = {
    "st-torch": SENTENCE_TRANSFORMERS,
    "st-onnx": SENTENCE_TRANSFORMERS,
    # a chat model's pooled states: real vectors, but not trained to put paraphrases together
    "llama-cpp": Capabilities(
        tokenizer=gguf_tokenizer, max_tokens=lambda model: model["context_size"], strict_option={"truncate": False}
    ),
}


def where(claim: Callable[[Capabilities], object]) -> pytest.MarkDecorator:
    """Run a test on the models whose capabilities make ``claim`` true (and only those: nothing is skipped)."""
    names = sorted(name for name in EMBEDDING_MODELS if claim(CAPABILITIES.get(name, Capabilities())))
    return pytest.mark.parametrize("subject", names, indirect=True)


SENTENCES = (
    "A man is eating food.",
    "The new movie is awesome, I loved every minute of it.",
    "Quarterly revenue grew by twelve percent.",
    "Two dogs play in the snow.",
)
# Batched kernels (padding, quantised matmuls over other shapes) move a vector by numeric noise only:
# an input's vector, alone or in a batch, is "the same" when their cosine is above this.
SAME = 0.999
PARAPHRASE = ("A man is eating a piece of bread.", "A man is eating food.", "The stock market fell sharply today.")


@dataclass(frozen=True)
class Subject:
    name: str
    model: dict[str, Any]
    instance: ModelInstance
    can: Capabilities

    async def embed(self, *inputs: str | tuple[int, ...], dimensions: int | None = None) -> EmbeddingResult:
        job = EmbeddingJob(inputs=inputs)
        check_job(self.instance.engine_class, self.instance.config, job)  # what admission checks
        result = await self.instance.embed(job)
        # engines return full vectors; the pool applies dimensions, the same way for every engine
        return EmbeddingResult(vectors=shorten(result.vectors, dimensions), token_counts=result.token_counts)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=sorted(EMBEDDING_MODELS))
async def subject(request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    model = EMBEDDING_MODELS[request.param]()
    instance = await load_instance(model)
    try:
        yield Subject(request.param, model, instance, CAPABILITIES.get(request.param, Capabilities()))
    finally:
        await instance.dispose()


def matrix(result: EmbeddingResult) -> np.ndarray:
    return np.asarray(result.vectors, dtype=np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ------------------------------------------------------------------------------------------ the basics


async def test_one_unit_vector_per_input_in_order(subject: Subject) -> None:
    together = matrix(await subject.embed(*SENTENCES))
    assert together.shape[0] == len(SENTENCES)
    assert together.shape[1] >= 8
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-4)
    for row, sentence in zip(together, SENTENCES, strict=True):
        assert cosine(row, matrix(await subject.embed(sentence))[0]) > SAME
    # different sentences, different vectors
    assert cosine(together[0], together[1]) < 0.99


async def test_usage_counts_every_input(subject: Subject) -> None:
    result = await subject.embed("hello", "hello there, how are you doing today?")
    assert len(result.token_counts) == 2
    assert 0 < result.token_counts[0] < result.token_counts[1]
    if subject.can.tokenizer is not None:
        tokenize = subject.can.tokenizer(subject.model)
        expected = [len(tokenize("hello")), len(tokenize("hello there, how are you doing today?"))]
        assert list(result.token_counts) == expected


@where(lambda can: can.semantic)
async def test_paraphrases_are_closer_than_unrelated_sentences(subject: Subject) -> None:
    bread, food, stocks = matrix(await subject.embed(*PARAPHRASE))
    assert cosine(bread, food) > cosine(bread, stocks) + 0.3


async def test_dimensions_give_unit_vectors_of_that_length(subject: Subject) -> None:
    full = matrix(await subject.embed(SENTENCES[0]))[0]
    short = matrix(await subject.embed(SENTENCES[0], dimensions=32))[0]
    assert short.shape == (32,)
    assert np.linalg.norm(short) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(short, full[:32] / np.linalg.norm(full[:32]), atol=1e-5)
    with pytest.raises(InvalidRequest) as refused:
        await subject.embed(SENTENCES[0], dimensions=full.shape[0] + 1)
    assert refused.value.param == "dimensions"


# ----------------------------------------------------------------------------------------- token input


@where(lambda can: can.tokenizer)
async def test_token_ids_embed_like_their_text(subject: Subject) -> None:
    text = "a man is eating food."
    ids = tuple(subject.can.tokenizer(subject.model)(text))
    by_ids, by_text = await subject.embed(ids), await subject.embed(text)
    np.testing.assert_allclose(matrix(by_ids), matrix(by_text), atol=1e-4)
    assert list(by_ids.token_counts) == [len(ids)]


async def test_token_ids_outside_the_vocabulary_are_refused(subject: Subject) -> None:
    with pytest.raises(InvalidRequest) as refused:
        await subject.embed((5, 10_000_000))
    assert refused.value.status == 400
    assert refused.value.param == "input"


# ----------------------------------------------------------------------------------------- long inputs


LONG = "the quick brown fox jumps over the lazy dog " * 120  # > 1000 tokens


@where(lambda can: can.max_tokens)
async def test_long_inputs_are_truncated(subject: Subject) -> None:
    limit = subject.can.max_tokens(subject.model)
    result = await subject.embed("short one", LONG)
    assert list(result.token_counts)[1] == limit
    np.testing.assert_allclose(np.linalg.norm(matrix(result), axis=1), 1.0, atol=1e-4)


@where(lambda can: can.strict_option and can.max_tokens)
async def test_long_inputs_are_refused_when_truncation_is_off(subject: Subject) -> None:
    strict = await load_instance({**subject.model, **subject.can.strict_option})
    try:
        strict_subject = replace(subject, instance=strict)
        with pytest.raises(InvalidRequest) as refused:
            await strict_subject.embed("short one", LONG)
        limit = str(subject.can.max_tokens(subject.model))
        message = refused.value.message
        assert "input[1]" in message
        assert limit in message
        if subject.can.tokenizer is not None:
            assert str(len(subject.can.tokenizer(subject.model)(LONG))) in message
        assert matrix(await strict_subject.embed("short one")).shape[0] == 1  # the instance still works
    finally:
        await strict.dispose()


# -------------------------------------------------------------------------------------------- batching


async def test_32_concurrent_requests_through_the_batcher_each_get_their_own(subject: Subject) -> None:
    texts = [f"{SENTENCES[i % 4]} (variant {i}, {'with extra words ' * (i % 3)})" for i in range(32)]
    alone = np.stack([matrix(await subject.embed(text))[0] for text in texts])

    config = model_config(subject.model)
    store = ModelStore(cache_dir=Path(subject.model["location"]).parent)

    async def files() -> Any:
        return await store.files("m", config)

    engine_class = await asyncio.to_thread(builtin_engines()[config.engine].class_for, config.task)
    config = config.model_copy(update={"batch_window_ms": 5, "max_batch_size": 32, "max_waiting": 64})
    pool = ModelPool("m", config, engine_class, files=files, limiter=ConcurrencyLimit(2), clock=SystemClock())
    batcher = pool.batcher
    assert batcher is not None
    try:
        results = await asyncio.gather(*(pool.embed(EmbeddingJob(inputs=(text,))) for text in texts))
    finally:
        await pool.close(0)
    together = np.stack([matrix(result)[0] for result in results])
    similarity = together @ alone.T  # unit vectors: cosines
    assert (np.diag(similarity) > SAME).all()
    assert (similarity.argmax(axis=1) == np.arange(32)).all()
    assert batcher.batches_run < 32  # they were batched
