"""Opening a GGUF as a ``llama_cpp.Llama`` for one instance: what both engine classes share.

Context: ``context_size``, or min(the model's training context, a default) read from the GGUF metadata:
4096 for text; for embeddings the whole context is one batch (pooling needs a sequence in one batch), so
the default is smaller (2048). A text model evaluates prompts ``batch_size`` tokens at a time.

Threads come from ``device`` or the defaults in ``threads.py``. The device and memory options
(``gpu_layers``, ``split_mode``, ``cache_type_k``, ``use_mmap``, ...) go to ``llama_cpp.Llama`` as they are;
``placement.py`` reads back what llama.cpp made of them.
"""

from __future__ import annotations

import logging
from typing import Any

import llama_cpp
from llama_cpp import _internals as internals

from lllmsd.config import LlamaCppModelConfig
from lllmsd.engines.base import ModelFiles
from lllmsd.engines.llama_cpp.placement import (
    NO_GPU_BACKEND,
    SPLIT_MODES,
    capture_load_log,
    forget_context_buffers,
    ggml_type,
    placement,
)
from lllmsd.engines.llama_cpp.threads import default_batch_threads, default_threads
from lllmsd.errors import InvalidRequest

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 4096
DEFAULT_EMBEDDING_CONTEXT = 2048


def load_llama(
    config: LlamaCppModelConfig, files: ModelFiles, *, embedding: bool, pooling: int = llama_cpp.LLAMA_POOLING_TYPE_MEAN
) -> tuple[llama_cpp.Llama, dict[str, Any]]:
    """The instance's ``Llama``: for generation, or (``embedding``) with ``pooling`` over one batch (mean
    for embeddings, rank for a reranker's classification head); and its placement report (placement.py)."""
    if files.path is None:
        raise InvalidRequest("the llama-cpp engine needs a GGUF file")
    path = str(files.path)
    context = config.context_size or default_context(path, DEFAULT_EMBEDDING_CONTEXT if embedding else DEFAULT_CONTEXT)
    batch, ubatch = batch_sizes(config, context, embedding=embedding)
    slots = config.slots  # 1 for embedding and rerank models (LlamaCppModelConfig.problems)
    with capture_load_log() as lines:
        llama = llama_cpp.Llama(
            path,
            n_ctx=context * slots,
            n_batch=batch,
            n_ubatch=ubatch,
            n_threads=config.device.threads or default_threads(config.max_instances, slots=slots),
            n_threads_batch=config.device.batch_threads or default_batch_threads(config.max_instances),
            embedding=embedding,
            pooling_type=pooling if embedding else llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED,
            n_gpu_layers=config.gpu_layers,
            main_gpu=config.main_gpu,
            split_mode=SPLIT_MODES[config.split_mode],
            tensor_split=config.tensor_split,
            flash_attn=config.flash_attention,
            type_k=ggml_type(config.cache_type_k),
            type_v=ggml_type(config.cache_type_v),
            offload_kqv=config.offload_kqv,
            use_mmap=config.use_mmap,
            use_mlock=config.use_mlock,
            verbose=False,
        )
        if slots > 1:
            forget_context_buffers(lines)  # the context they describe is about to be replaced
            share_context(llama, slots)
    report = placement(llama, config.gpu_layers, lines)
    log.info("llama-cpp: loaded %s (context %d)", path, llama.n_ctx())
    return llama, report


def share_context(llama: llama_cpp.Llama, slots: int) -> None:
    """Give ``llama`` a context of ``slots`` sequences, each with an equal share of its n_ctx (one KV cache per
    sequence, not one unified cache: a sequence can never take another's room). llama-cpp-python's ``Llama``
    makes a context of one sequence for generation and has no parameter for more, so its context is freed
    and made again with the same parameters and ``n_seq_max``."""
    params = llama.context_params
    params.n_seq_max = slots
    params.kv_unified = False
    llama._ctx.close()  # before the new one: the two KV caches are never held at once
    llama._ctx = internals.LlamaContext(model=llama._model, params=params, verbose=False)


def gpu_warnings(config: LlamaCppModelConfig) -> list[tuple[str, str]]:
    if config.gpu_layers != 0 and not llama_cpp.llama_supports_gpu_offload():
        return [("gpu_layers", NO_GPU_BACKEND.format(layers=config.gpu_layers))]
    return []


def batch_sizes(config: LlamaCppModelConfig, context: int, *, embedding: bool) -> tuple[int, int]:
    """(n_batch, n_ubatch): an embedding model pools one sequence, so it takes its whole context at once."""
    if embedding:
        return context, context
    batch = min(config.batch_size, context)
    return batch, min(config.ubatch_size or batch, batch)


def model_metadata(path: str) -> dict[str, str]:
    """The GGUF's scalar metadata as llama.cpp reads it (a vocabulary-only load: no weights); arrays (the
    vocabulary, per-layer shapes) are not in it."""
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = internals.LlamaModel(path_model=path, params=params, verbose=False)
    try:
        return dict(model.metadata())
    finally:
        model.close()


def default_context(path: str, limit: int) -> int:
    """min(training context, ``limit``), read from the GGUF metadata with a vocabulary-only load."""
    metadata = model_metadata(path)
    arch = metadata.get("general.architecture", "")
    trained = int(metadata.get(f"{arch}.context_length", 0) or 0)
    return min(trained, limit) if trained > 0 else limit


def tokenize(llama: llama_cpp.Llama, text: str, *, add_bos: bool = True) -> list[int]:
    """Text to token ids; special-token text (``<|im_start|>``) becomes the special token, as templates mean it."""
    return llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
