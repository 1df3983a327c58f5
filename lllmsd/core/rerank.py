"""Reranking on an embedding model: the bi-encoder way.

A cross-encoder (a ``rerank`` model) reads the query and each document together and scores the pair; it
ranks better, and its engine runs the job itself (``RerankEngine``). An embedding model has no such head,
but it can still rank: embed the query and the documents, and score each document by the cosine
similarity of its vector to the query's (-1 to 1). Every embedding model answers rerank requests this
way unless its config's ``rerank_by_cosine`` is off, through its pool's batcher: the query and documents
are one embedding request, batched with the model's other requests under the same queue, instances and
concurrency limit (core/batcher.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import numpy as np

from lllmsd.core.jobs import EmbeddingJob, EmbeddingResult, RerankJob, RerankResult

Embed = Callable[[EmbeddingJob], Awaitable[EmbeddingResult]]


def embedding_job(job: RerankJob) -> EmbeddingJob:
    """The query first, then the documents, each named as the request named it (for length errors)."""
    names = ("query", *(f"documents[{index}]" for index in range(len(job.documents))))
    return EmbeddingJob(inputs=(job.query, *job.documents), names=names)


def cosine_scores(vectors: np.ndarray) -> np.ndarray:
    """Cosine similarity of rows 1.. to row 0 (the query). Engines return unit vectors, mostly; they are
    normalised here anyway, so a model without a Normalize module ranks by the angle too."""
    matrix = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(matrix, axis=1)
    units = matrix / np.where(norms == 0, 1, norms)[:, None]
    return units[1:] @ units[0]


async def rerank_by_cosine(embed: Embed, job: RerankJob) -> RerankResult:
    result = await embed(embedding_job(job))
    scores = cosine_scores(np.asarray(result.vectors))
    return RerankResult(scores=[float(s) for s in scores], total_tokens=int(sum(result.token_counts)))
