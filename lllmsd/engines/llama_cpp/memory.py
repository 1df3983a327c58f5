"""What one llama-cpp instance will take in memory, from the GGUF's metadata, before it loads.

An instance is a worker process holding, for its context size and cache types:
- the weights: the tensors' bytes, as stored in the file (mapped or read, they end up resident);
- the KV cache: layers x context x (K heads x head size x bytes of cache_type_k + the same for V);
  llama.cpp clears it at load, so all of it is resident at once;
- the activations of one micro-batch (``ubatch_size`` tokens) that a prompt touches: the FFN and residual
  stream, and, without flash attention, the attention scores over the whole context (they grow with
  context x ubatch x heads; flash attention never materialises them);
- the runtime: the Python interpreter with llama_cpp imported (40 MiB on this machine) and the buffers
  that do not scale with the model (logits row, llama-cpp-python's arrays).

Figures measured on SmolLM2-135M Q4_1 (92 MiB of tensors, 30 layers, 3 KV heads of 64, 9 heads), RSS of
the process after a prompt that fills the context, MiB: ctx 1024 f16 213, ctx 2048 f16 263, ctx 8192 f16
(the numbers in docs/accelerators.md), ctx 1024 q8_0+flash 182, ctx 2048 q8_0+flash 195. The attention
term's factor (1.5 score matrices live at once: the scores and part of the softmax output) and the runtime
constant are fitted to those; tests/engines/test_memory_estimate.py holds the estimate to 25% of the real
RSS. llama.cpp also reserves a compute buffer for a worst case (logits for every token of a micro-batch)
that generation never touches; it is not counted, as it never becomes resident.

Memory offloaded to a GPU is not subtracted: the estimate is the host memory of a CPU instance, an upper
bound for an offloaded one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from lllmsd.config import LlamaCppModelConfig
from lllmsd.engines.base import ModelFiles
from lllmsd.engines.llama_cpp.model import model_metadata
from lllmsd.errors import ModelUnavailable

MIB = 1024 * 1024
RUNTIME = 56 * MIB  # the interpreter with llama_cpp imported (40 MiB) and buffers that do not scale
FLOAT = 4
SCORE_COPIES = 1.5  # attention score matrices resident at once without flash attention (fitted, see above)
# bytes per element of each cache type: ggml block size and bytes per block
CACHE_TYPE_BYTES = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q4_0": 18 / 32,
    "q4_1": 20 / 32,
    "q5_0": 22 / 32,
    "q5_1": 24 / 32,
    "iq4_nl": 18 / 32,
}
DEFAULT_CONTEXT = 4096  # as model.py: the same defaults
DEFAULT_EMBEDDING_CONTEXT = 2048


@dataclass(frozen=True)
class GgufShape:
    """What the estimate needs from a GGUF."""

    tensor_bytes: int
    layers: int
    context_trained: int
    embedding: int
    feed_forward: int
    heads: int
    kv_heads: int
    key_length: int
    value_length: int


@dataclass(frozen=True)
class Estimate:
    weights: int
    kv_cache: int
    activations: int
    runtime: int
    context: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.runtime

    def as_dict(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "kv_cache": self.kv_cache,
            "activations": self.activations,
            "runtime": self.runtime,
            "total": self.total,
        }


def read_shape(path: str) -> GgufShape:
    """The GGUF's tensor bytes and attention shape.

    The scalars come from llama.cpp's own reader (a vocabulary-only load: ~0.2 s for SmolLM2), the tensor
    bytes from the file's size (the header, mostly the vocabulary, is a few MiB of it: an over-estimate of
    2% for SmolLM2, less for larger models). The gguf package's reader took 6 s on SmolLM2 (it builds an
    array for every token of the vocabulary in Python), on every load; it is used only for a model whose
    shape llama.cpp lists as per-layer arrays, which its scalar metadata leaves out."""
    metadata = model_metadata(path)
    arch = metadata.get("general.architecture", "llama")
    needed = (f"{arch}.embedding_length", f"{arch}.block_count", f"{arch}.attention.head_count")
    if any(key not in metadata for key in needed):
        return _read_shape_with_gguf(path)

    def value(key: str, default: int) -> int:
        return int(float(metadata[key])) if key in metadata else default

    embedding = value(f"{arch}.embedding_length", 0)
    heads = value(f"{arch}.attention.head_count", 1)
    head_size = embedding // max(heads, 1)
    return GgufShape(
        tensor_bytes=os.path.getsize(path),
        layers=value(f"{arch}.block_count", 0),
        context_trained=value(f"{arch}.context_length", 0),
        embedding=embedding,
        feed_forward=value(f"{arch}.feed_forward_length", 4 * embedding),
        heads=heads,
        kv_heads=value(f"{arch}.attention.head_count_kv", heads),
        key_length=value(f"{arch}.attention.key_length", head_size),
        value_length=value(f"{arch}.attention.value_length", head_size),
    )


def _read_shape_with_gguf(path: str) -> GgufShape:
    """The slow reader, for per-layer shapes (memory-mapped by the gguf package: no weights read)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelUnavailable(
            "estimating a GGUF's memory needs the gguf package: pip install 'lllmsd[llama-cpp]'"
        ) from None
    reader = GGUFReader(path)

    def value(key: str, default: Any = None) -> Any:
        found = reader.get_field(key)
        return default if found is None else found.contents()

    arch = value("general.architecture", "llama")
    embedding = int(value(f"{arch}.embedding_length", 0))
    heads = _first(value(f"{arch}.attention.head_count", 1))
    kv_heads = _first(value(f"{arch}.attention.head_count_kv", heads))
    head_size = embedding // max(heads, 1)
    return GgufShape(
        tensor_bytes=sum(int(t.n_bytes) for t in reader.tensors),
        layers=int(value(f"{arch}.block_count", 0)),
        context_trained=int(value(f"{arch}.context_length", 0) or 0),
        embedding=embedding,
        feed_forward=_first(value(f"{arch}.feed_forward_length", 4 * embedding)),
        heads=heads,
        kv_heads=kv_heads,
        key_length=int(value(f"{arch}.attention.key_length", head_size)),
        value_length=int(value(f"{arch}.attention.value_length", head_size)),
    )


def _first(value: Any) -> int:
    """Per-layer arrays (some architectures vary heads by layer): the largest."""
    return int(max(value)) if isinstance(value, list) else int(value)


def estimate(shape: GgufShape, config: LlamaCppModelConfig, *, embedding: bool) -> Estimate:
    default = DEFAULT_EMBEDDING_CONTEXT if embedding else DEFAULT_CONTEXT
    context = config.context_size or (min(shape.context_trained, default) if shape.context_trained else default)
    batch = context if embedding else min(config.batch_size, context)
    ubatch = batch if embedding else min(config.ubatch_size or batch, batch)
    keys = shape.key_length * CACHE_TYPE_BYTES[config.cache_type_k]
    values = shape.value_length * CACHE_TYPE_BYTES[config.cache_type_v]
    per_token = shape.kv_heads * (keys + values)
    kv = int(shape.layers * context * per_token * config.slots)  # each slot's sequence has its own
    activations = FLOAT * ubatch * (3 * shape.feed_forward + 4 * shape.embedding)
    if not config.flash_attention:
        activations += int(SCORE_COPIES * FLOAT * ubatch * shape.heads * context)
    return Estimate(shape.tensor_bytes, kv, activations, RUNTIME, context)


def gguf_estimate(config: LlamaCppModelConfig, files: ModelFiles, *, embedding: bool) -> Estimate:
    if files.path is None:
        raise ModelUnavailable("the llama-cpp engine needs a GGUF file")
    return estimate(read_shape(str(files.path)), config, embedding=embedding)
