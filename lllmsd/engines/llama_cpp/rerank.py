"""The llama-cpp rerank engine: GGUF cross-encoders (bge-reranker, jina-reranker) with rank pooling.

A reranker GGUF carries a classification head (``cls``, ``cls.output``); llama.cpp's rank pooling runs it
on the first token of each sequence and gives one value per sequence. Choices made here, and why:
- Each (query, document) pair is one sequence, built as llama-server builds it from the vocabulary's own
  special tokens: [BOS] query [EOS] [SEP] document [EOS], each only if the model adds it, and a closing
  [SEP] for vocabularies that end sequences with SEP rather than EOS (BERT: [CLS] q [SEP] d [SEP], what
  transformers' tokenizer makes of a pair).
- The score is the head's value through a sigmoid (0 to 1), as sentence-transformers' CrossEncoder scores
  one-label models, so one reranker scores alike on both engines; the order is the raw value's.
- Like embeddings, a sequence must fit one batch (``n_batch = n_ctx``, model.py), and the model's
  training context bounds its positions: a longer pair loses document tokens first (``truncate``, the
  default), then query tokens, or is refused with a 400 naming the document.
- Pairs are packed several to a batch, each its own sequence, up to the batch's tokens and sequences.
"""

from __future__ import annotations

import math

import llama_cpp

from lllmsd.config import LlamaCppModelConfig
from lllmsd.core.jobs import RerankJob, RerankResult
from lllmsd.engines.base import ModelFiles, RerankEngine
from lllmsd.engines.llama_cpp.embedding import pack
from lllmsd.engines.llama_cpp.model import load_llama
from lllmsd.engines.llama_cpp.resources import LlamaResources
from lllmsd.errors import InvalidRequest, ModelUnavailable


class LlamaCppRerankEngine(LlamaResources, RerankEngine):
    pooled_outputs = True
    name = "llama-cpp"
    features = frozenset()

    def __init__(self, config: LlamaCppModelConfig, files: ModelFiles) -> None:
        super().__init__(config, files)
        self._llama, self._placement = load_llama(
            config, files, embedding=True, pooling=llama_cpp.LLAMA_POOLING_TYPE_RANK
        )
        model = self._llama.model
        if llama_cpp.llama_pooling_type(self._llama.ctx) != llama_cpp.LLAMA_POOLING_TYPE_RANK:
            self.close()
            raise ModelUnavailable(f"{files.path} cannot rank: llama.cpp does not run rank pooling on it")
        if llama_cpp.llama_model_n_cls_out(model) != 1:
            labels = llama_cpp.llama_model_n_cls_out(model)
            self.close()
            raise ModelUnavailable(f"{files.path} has {labels} outputs, not a reranker's one score per pair")
        # positions past the training context do not exist in an absolute-position model (BERT)
        self.max_tokens = min(self._llama.n_ctx(), self._llama.n_batch, self._llama._model.n_ctx_train())
        vocab = llama_cpp.llama_model_get_vocab(model)
        self._open = self._special(vocab, bos=True)
        self._middle = self._special(vocab, eos=True, sep=True)
        self._close = self._special(vocab, eos=True) or self._special(vocab, sep=True)

    @staticmethod
    def _special(
        vocab: llama_cpp.llama_vocab_p, *, bos: bool = False, eos: bool = False, sep: bool = False
    ) -> list[int]:
        tokens = []
        if bos and llama_cpp.llama_vocab_get_add_bos(vocab):
            tokens.append(llama_cpp.llama_vocab_bos(vocab))
        if eos and llama_cpp.llama_vocab_get_add_eos(vocab):
            tokens.append(llama_cpp.llama_vocab_eos(vocab))
        if sep and llama_cpp.llama_vocab_get_add_sep(vocab):
            tokens.append(llama_cpp.llama_vocab_sep(vocab))
        return [t for t in tokens if t >= 0]

    def close(self) -> None:
        llama, self._llama = self._llama, None
        if llama is not None:
            llama.close()

    def rerank(self, job: RerankJob) -> RerankResult:
        query = self._tokenize(job.query)
        sequences = [self._pair(query, self._tokenize(document), index) for index, document in enumerate(job.documents)]
        scores: list[float] = []
        for group in pack(sequences, self._llama.n_batch, self._llama.context_params.n_seq_max):
            scores += self._score(group)
        return RerankResult(scores=scores, total_tokens=sum(len(s) for s in sequences))

    def _tokenize(self, text: str) -> list[int]:
        return self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def _pair(self, query: list[int], document: list[int], index: int) -> list[int]:
        fixed = len(self._open) + len(self._middle) + len(self._close)
        length = fixed + len(query) + len(document)
        if length > self.max_tokens:
            if not self.config.truncate:
                raise InvalidRequest(
                    f"documents[{index}] is {length} tokens long together with the query, but this model reads "
                    f"at most {self.max_tokens} (truncate is off for this model)",
                    param="documents",
                    code="context_length_exceeded",
                )
            room = self.max_tokens - fixed
            document = document[: max(room - len(query), 0)]  # the document gives way first,
            query = query[: room - len(document)]  # then the query, if it alone is too long
        return [*self._open, *query, *self._middle, *document, *self._close]

    def _score(self, group: list[list[int]]) -> list[float]:
        llama = self._llama
        batch = llama._batch
        batch.reset()
        for seq_id, tokens in enumerate(group):
            batch.add_sequence(tokens, seq_id, True)
        llama._ctx.kv_cache_clear()
        llama._ctx.decode(batch)
        scores = []
        for seq_id in range(len(group)):
            scores.append(_sigmoid(float(llama_cpp.llama_get_embeddings_seq(llama.ctx, seq_id)[0])))
        batch.reset()
        llama._ctx.kv_cache_clear()
        return scores


def _sigmoid(value: float) -> float:
    if value >= 0:
        return 1.0 / (1.0 + math.exp(-value))
    exp = math.exp(value)  # never overflows for a very negative value
    return exp / (1.0 + exp)
