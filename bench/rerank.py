"""Rerank throughput: documents ranked per second, 100 documents per request, lllmsd vs the raw engine.

Subjects, each measured (a) in this process, straight on the library, and (b) through lllmsd over HTTP
(POST /v1/rerank, one client sending one request at a time, as a retrieval pipeline does), in
interleaved rounds so a neighbour's load hits both alike; the figures are the medians:
  - minilm-torch: all-MiniLM-L6-v2 ranking by cosine (the bi-encoder path). (a) is sentence-transformers'
    ``encode([query, *documents])`` and a numpy cosine;
  - minilm-onnx: the same model, int8 ONNX. (a) is lllmsd's onnx embedding runner in-process and a
    numpy cosine (there is no library call to compare with: the engine is onnxruntime and tokenizers);
  - cross-encoder: a cross-encoder of ms-marco-MiniLM-L-6-v2's size (all-MiniLM-L6-v2's encoder and a
    random one-label head: no cross-encoder weights ship on PyPI, and speed does not depend on the head's
    values). (a) is ``CrossEncoder.predict(pairs, batch_size=32)``;
  - gguf: the same weights as a llama.cpp GGUF reranker (rank pooling). (a) is lllmsd's llama-cpp rerank
    engine in-process (llama-cpp-python has no rerank call of its own).
Both sides use the same threads (--threads, default 2). Target: (b)/(a) >= 0.9.

    .venv/bin/python bench/rerank.py [--seconds 4] [--rounds 3] [--subjects minilm-torch,minilm-onnx,...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from child_daemon import ChildDaemon  # noqa: E402 - bench/ is the script's folder: its sibling module

from tests.setup_models import MODELS_DIR, minilm, minilm_onnx, write_bert_reranker_gguf  # noqa: E402

DOCUMENTS = 100
QUERY = "Which city is the capital of France, and what river flows through it?"
TOPICS = ("Paris", "the Seine", "Lyon", "a cat", "the stock market", "rain", "a new phone", "football", "bread")
FACTS = ("was in the news today", "is known all over Europe", "changed a lot over the years", "surprised everyone")
DOCS = [f"{t} {f}, said report number {n}." for n in range(3) for t in TOPICS for f in FACTS][:DOCUMENTS]
SUBJECTS = ("minilm-torch", "minilm-onnx", "cross-encoder", "gguf")


def cross_encoder_minilm_size() -> Path:
    """all-MiniLM-L6-v2's encoder with a seeded random one-label head, saved as a cross-encoder folder."""
    out = MODELS_DIR / "bench-cross-encoder-minilm-size"
    if (out / "model.safetensors").exists():
        return out
    import shutil

    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(18)
    source = minilm()
    model = BertForSequenceClassification.from_pretrained(str(source), num_labels=1).eval()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copyfile(source / name, tmp / name)
    tmp.rename(out)
    return out


def gguf_minilm_size() -> Path:
    out = MODELS_DIR / "bench-cross-encoder-minilm-size.gguf"
    if not out.exists():
        write_bert_reranker_gguf(cross_encoder_minilm_size(), out)
    return out


def model(subject: str, threads: int) -> dict[str, Any]:
    device = {"threads": threads}
    if subject == "minilm-torch":
        return {"task": "embedding", "engine": "sentence-transformers", "location": str(minilm()), "device": device}
    if subject == "minilm-onnx":
        return {
            "task": "embedding",
            "engine": "sentence-transformers",
            "backend": "onnx",
            "file_name": "onnx/model_qint8.onnx",
            "location": str(minilm_onnx()),
            "device": device,
        }
    if subject == "cross-encoder":
        location = str(cross_encoder_minilm_size())
        return {"task": "rerank", "engine": "sentence-transformers", "location": location, "device": device}
    device["batch_threads"] = threads
    return {"task": "rerank", "engine": "llama-cpp", "location": str(gguf_minilm_size()), "device": device}


# ----------------------------------------------------------------------------------------- (a) raw


class Raw:
    """One subject's library in this process: ``rank()`` scores the 100 documents once."""

    def __init__(self, subject: str, threads: int) -> None:
        import numpy as np
        import torch

        torch.set_num_threads(threads)
        self.np = np
        config = _config(model(subject, threads))
        if subject == "minilm-torch":
            from sentence_transformers import SentenceTransformer

            encoder = SentenceTransformer(str(minilm()), device="cpu", local_files_only=True)
            self.rank = lambda: self._cosine(encoder.encode([QUERY, *DOCS], batch_size=32, show_progress_bar=False))
        elif subject == "minilm-onnx":
            from lllmsd.engines.sentence_transformers import _OnnxRunner

            runner = _OnnxRunner(Path(config.location), config.file_name, threads)
            texts = [QUERY, *DOCS]
            self.rank = lambda: self._cosine(
                np.concatenate([runner.encode(texts[i : i + 32]) for i in range(0, len(texts), 32)])
            )
        elif subject == "cross-encoder":
            from sentence_transformers import CrossEncoder

            scorer = CrossEncoder(str(config.location), device="cpu", local_files_only=True)
            pairs = [(QUERY, d) for d in DOCS]
            self.rank = lambda: scorer.predict(pairs, batch_size=32, show_progress_bar=False)
        else:
            from lllmsd.core.jobs import RerankJob
            from lllmsd.engines.base import ModelFiles
            from lllmsd.engines.llama_cpp.rerank import LlamaCppRerankEngine

            engine = LlamaCppRerankEngine(config, ModelFiles(Path(config.location)))
            job = RerankJob(query=QUERY, documents=tuple(DOCS))
            self.rank = lambda: engine.rerank(job)
        self.rate(1.0)  # warm-up

    def _cosine(self, vectors: Any) -> Any:
        units = vectors / self.np.linalg.norm(vectors, axis=1, keepdims=True)
        return self.np.argsort(-(units[1:] @ units[0]))

    def rate(self, seconds: float) -> float:
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            self.rank()
            done += DOCUMENTS
        return done / (time.perf_counter() - started)


def _config(options: dict[str, Any]) -> Any:
    from lllmsd.config import parse_config

    return parse_config({"models": {"m": options}}).models["m"]


# ------------------------------------------------------------------------------------- (b) lllmsd


class Daemon(ChildDaemon):
    def __init__(self, subject: str, threads: int) -> None:
        super().__init__({"m": {**model(subject, threads), "min_instances": 1}})
        import requests

        self.session = requests.Session()
        self.url = f"http://127.0.0.1:{self.port}/v1/rerank"
        self.body = {"model": "m", "query": QUERY, "documents": DOCS, "top_n": 10, "return_documents": False}
        for _ in range(600):  # until the instance is loaded and answers
            if self.session.post(self.url, json=self.body, timeout=300).status_code == 200:
                break
            time.sleep(0.1)
        self.rate(1.0)  # warm-up

    def rate(self, seconds: float) -> float:
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            response = self.session.post(self.url, json=self.body, timeout=300)
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {response.text}")
            done += DOCUMENTS
        return done / (time.perf_counter() - started)


# --------------------------------------------------------------------------------------------- main


def measure(subject: str, threads: int, seconds: float, rounds: int) -> None:
    raw = Raw(subject, threads)
    daemon = Daemon(subject, threads)
    figures: dict[str, list[float]] = {"a": [], "b": []}
    try:
        for round_ in range(1, rounds + 1):
            figures["a"].append(raw.rate(seconds))
            figures["b"].append(daemon.rate(seconds))
            print(f"[{subject}] round {round_}: (a) {figures['a'][-1]:7.1f}  (b) {figures['b'][-1]:7.1f}", flush=True)
    finally:
        daemon.close()
    a, b = (statistics.median(figures[k]) for k in "ab")
    print(f"[{subject}] (a) raw engine: {a:8.1f} documents/s")
    print(f"[{subject}] (b) lllmsd:     {b:8.1f} documents/s   (b)/(a) = {b / a:.2f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring time per figure and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both sides")
    parser.add_argument("--subjects", default=",".join(SUBJECTS))
    args = parser.parse_args()
    print(
        f"{DOCUMENTS} documents per request, one client, {args.rounds} rounds of {args.seconds:g}s per figure, "
        f"{args.threads} threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    for subject in args.subjects.split(","):
        measure(subject, args.threads, args.seconds, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
