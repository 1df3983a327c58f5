"""The llama-cpp embedding engine: mean-pooled, unit-length vectors from a GGUF.

Choices made here, and why:
- The whole context is one batch (``n_batch = n_ctx``, model.py): llama.cpp pools a sequence only when
  all its tokens are in one batch. So an input longer than the context is cut to it (``truncate``, the
  default) or refused with a 400.
- Inputs are packed several to a batch, each its own sequence, up to the batch's tokens and sequences;
  batching moves a vector only by rounding.
- Vectors are L2-normalised here and returned full length; the pool applies ``dimensions`` for every
  engine, so there is no shortening here.
- Token-id inputs are embedded as given (after a vocabulary check): a text's ids embed like the text.
"""

from __future__ import annotations

from collections.abc import Iterator

import llama_cpp
import numpy as np

from lllmsd.config import LlamaCppModelConfig
from lllmsd.core.jobs import EmbeddingJob, EmbeddingResult, Feature
from lllmsd.engines.base import EmbeddingEngine, ModelFiles
from lllmsd.engines.llama_cpp.model import load_llama, tokenize
from lllmsd.engines.llama_cpp.resources import LlamaResources
from lllmsd.errors import InvalidRequest


class LlamaCppEmbeddingEngine(LlamaResources, EmbeddingEngine):
    pooled_outputs = True
    name = "llama-cpp"
    features = frozenset({Feature.TOKEN_INPUT})

    def __init__(self, config: LlamaCppModelConfig, files: ModelFiles) -> None:
        super().__init__(config, files)
        self._llama, self._placement = load_llama(config, files, embedding=True)
        self.context_size = self._llama.n_ctx()
        self.n_vocab = self._llama.n_vocab()

    def close(self) -> None:
        llama, self._llama = self._llama, None
        if llama is not None:
            llama.close()

    def embed(self, job: EmbeddingJob) -> EmbeddingResult:
        sequences = [self._tokens(item, *job.name_of(index)) for index, item in enumerate(job.inputs)]
        vectors: list[list[float]] = []
        for group in self._batches(sequences):
            vectors += self._embed_batch(group)
        return EmbeddingResult(vectors=vectors, token_counts=[len(s) for s in sequences])

    def _tokens(self, item: str | tuple[int, ...], name: str, param: str) -> list[int]:
        tokens = tokenize(self._llama, item) if isinstance(item, str) else [int(t) for t in item]
        if not tokens:
            raise InvalidRequest("input: empty inputs cannot be embedded", param="input", code="invalid_value")
        if any(not 0 <= t < self.n_vocab for t in tokens):
            raise InvalidRequest(
                "input: a token id is not in the model's vocabulary", param="input", code="invalid_value"
            )
        if len(tokens) > self.context_size:
            if self.config.truncate:  # a sequence is evaluated whole in one batch of context_size tokens
                return tokens[: self.context_size]
            raise InvalidRequest(
                f"{name} is {len(tokens)} tokens, longer than the model's maximum of {self.context_size} "
                "tokens (truncate is off for this model)",
                param=param,
                code="context_length_exceeded",
            )
        return tokens

    def _batches(self, sequences: list[list[int]]) -> Iterator[list[list[int]]]:
        return pack(sequences, self._llama.n_batch, self._llama.context_params.n_seq_max)

    def _embed_batch(self, group: list[list[int]]) -> list[list[float]]:
        llama = self._llama
        batch = llama._batch
        batch.reset()
        for seq_id, tokens in enumerate(group):
            batch.add_sequence(tokens, seq_id, True)  # every token an output: pooling reads them all
        llama._ctx.kv_cache_clear()
        llama._ctx.decode(batch)
        n_embd = llama.n_embd()
        vectors = []
        for seq_id in range(len(group)):
            pointer = llama_cpp.llama_get_embeddings_seq(llama.ctx, seq_id)
            vectors.append(_normalised(np.ctypeslib.as_array(pointer, shape=(n_embd,)).astype(np.float64)))
        batch.reset()
        llama._ctx.kv_cache_clear()
        return vectors


def pack(sequences: list[list[int]], limit_tokens: int, limit_seqs: int) -> Iterator[list[list[int]]]:
    """Pack sequences, in order, into batches of at most ``limit_tokens`` tokens and ``limit_seqs`` sequences."""
    group: list[list[int]] = []
    size = 0
    for tokens in sequences:
        if group and (size + len(tokens) > limit_tokens or len(group) >= limit_seqs):
            yield group
            group, size = [], 0
        group.append(tokens)
        size += len(tokens)
    if group:
        yield group


def _normalised(vector: np.ndarray) -> list[float]:
    norm = float(np.sqrt(vector @ vector)) or 1.0
    return (vector / norm).tolist()
