"""Rerank models from a sentence-transformers ``CrossEncoder`` folder (bge-reranker, ms-marco MiniLM, ...).

A cross-encoder reads the query and one document together, as one sequence, and its classification head
gives the pair one score. It ranks better than comparing separate embeddings, and costs one forward pass
per document. The score is what ``CrossEncoder.predict`` gives: the model's own activation on its single
logit (a sigmoid unless the folder names another), so most models score 0 to 1.

- Torch only: the library's ONNX backend needs ``optimum``, which cannot be installed beside
  sentence-transformers 6 (see docs/embeddings.md); ``backend: onnx`` is a config error for this task.
- Models with more than one label (NLI classifiers) have no single relevance score: they fail to load.
- Long lists: ``CrossEncoder.predict`` sorts the pairs by length and runs ``max_batch_size`` of them per
  forward pass, so short documents are not padded to the longest one.
- Length: a pair longer than the model's ``max_seq_length`` is cut (``truncate``, the default; the
  longer of query and document loses tokens first) or refused with a 400 naming the document. Token
  counts are from the model's own tokenizer, special tokens included, after truncation.

Loading never touches the network (``local_files_only``); the store puts the folder in place first.
"""

from __future__ import annotations

import logging
from typing import Any

from lllmsd.config import ModelBase, SentenceTransformersModelConfig
from lllmsd.core.jobs import RerankJob, RerankResult
from lllmsd.engines.base import ModelFiles, RerankEngine
from lllmsd.engines.sentence_transformers import DEFAULT_MAX_SEQ_LENGTH, model_folder
from lllmsd.errors import InvalidRequest, ModelUnavailable

log = logging.getLogger(__name__)


class SentenceTransformersCrossEncoder(RerankEngine):
    name = "sentence-transformers"
    features = frozenset()

    @classmethod
    def config_problems(cls, config: ModelBase) -> list[tuple[str, str]]:
        if getattr(config, "backend", "torch") != "torch":
            return [("backend", "rerank models (CrossEncoder) run on torch only: the onnx backend embeds")]
        return []

    def __init__(self, config: SentenceTransformersModelConfig, files: ModelFiles) -> None:
        super().__init__(config, files)
        folder = model_folder(files)
        try:
            import torch
            from sentence_transformers import CrossEncoder
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ModelUnavailable(
                f"rerank models need sentence-transformers and torch: pip install 'lllmsd[sentence-transformers]' "
                f"({exc})"
            ) from exc
        if config.device.threads is not None:
            # torch's intra-op pool is process-wide: this also sets it for other torch models in the process
            torch.set_num_threads(config.device.threads)
        try:
            self.model = CrossEncoder(str(folder), device="cpu", local_files_only=True, backend="torch")
        except OSError as exc:
            raise ModelUnavailable(f"cannot load the CrossEncoder folder {folder}: {exc}") from exc
        if self.model.num_labels != 1:
            raise ModelUnavailable(
                f"{folder} is a classifier with {self.model.num_labels} labels, not a reranker (one score per pair)"
            )
        self.max_seq_length = int(self.model.max_seq_length or DEFAULT_MAX_SEQ_LENGTH)
        backend = getattr(self.model.tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ModelUnavailable(f"{folder}: the tokenizer is not a fast (tokenizers) one: it cannot count tokens")
        # a private copy that neither truncates nor pads: for counting and length checks
        self._counter: Any = Tokenizer.from_str(backend.to_str())
        self._counter.no_truncation()
        self._counter.no_padding()
        self._torch = torch
        log.info("loaded cross-encoder %s (max %d tokens)", folder, self.max_seq_length)

    def close(self) -> None:
        del self.model

    def rerank(self, job: RerankJob) -> RerankResult:
        pairs = [(job.query, document) for document in job.documents]
        lengths = [len(encoding.ids) for encoding in self._counter.encode_batch(pairs)]
        if not self.config.truncate:
            self._check_lengths(job, lengths)
        with self._torch.inference_mode():
            scores = self.model.predict(
                pairs, batch_size=self.config.max_batch_size, show_progress_bar=False, convert_to_numpy=True
            )
        tokens = sum(min(length, self.max_seq_length) for length in lengths)
        return RerankResult(scores=[float(s) for s in scores], total_tokens=tokens)

    def _check_lengths(self, job: RerankJob, lengths: list[int]) -> None:
        limit = self.max_seq_length
        query = len(self._counter.encode(job.query).ids)
        if query > limit:
            raise InvalidRequest(
                f"query is {query} tokens long, but this model reads at most {limit} tokens of query and document "
                "together (truncate is off for this model)",
                param="query",
                code="context_length_exceeded",
            )
        for index, length in enumerate(lengths):
            if length > limit:
                raise InvalidRequest(
                    f"documents[{index}] is {length} tokens long together with the query, but this model reads at "
                    f"most {limit} (truncate is off for this model)",
                    param="documents",
                    code="context_length_exceeded",
                )
