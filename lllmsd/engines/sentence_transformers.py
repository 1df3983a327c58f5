"""Sentence-embedding models from a sentence-transformers folder, on torch or on onnxruntime.

``backend: torch`` runs the folder through sentence-transformers itself. ``backend: onnx`` runs an ONNX
export of the same transformer with onnxruntime and does the rest of the sentence-transformers pipeline
here - tokenize (the folder's ``tokenizer.json``), run, pool as ``1_Pooling/config.json`` says (mean,
CLS or max), L2-normalise if ``modules.json`` has a Normalize module. That avoids
``sentence-transformers[onnx]``, whose optimum dependency cannot resolve with sentence-transformers 6,
and onnxruntime is ~2x faster than torch on small CPUs and degrades far less under load.

Loading never touches the network: the folder must exist locally (the model store downloads first) and
sentence-transformers is called with ``local_files_only=True``, so a missing file fails at once instead
of retrying the Hub for a minute.

Token counts are from the model's real tokenizer, special tokens included: what the model processed
(after truncation to ``max_seq_length``). Token-id inputs are decoded with the same tokenizer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lllmsd.config import SentenceTransformersModelConfig
from lllmsd.core.jobs import EmbeddingJob, EmbeddingResult, Feature
from lllmsd.engines.base import EmbeddingEngine, ModelFiles
from lllmsd.errors import InvalidRequest, ModelUnavailable

log = logging.getLogger(__name__)

DEFAULT_ONNX_FILES = ("onnx/model.onnx", "model.onnx")
DEFAULT_MAX_SEQ_LENGTH = 512
MIN_CHUNK = 32


def torch_device(config: SentenceTransformersModelConfig) -> str | None:
    """The torch device string: cpu, cuda:INDEX, mps; None for auto (sentence-transformers picks cuda, mps
    or cpu, whichever torch can use)."""
    kind = config.device.type
    if kind == "auto":
        return None
    return f"cuda:{config.device.index}" if kind == "cuda" else kind


def onnx_providers(config: SentenceTransformersModelConfig) -> list[str]:
    """The onnxruntime execution providers to ask for, in order; checked against the installed build at load."""
    if config.providers is not None:
        return list(config.providers)
    return {
        "cpu": ["CPUExecutionProvider"],
        "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "mps": ["CoreMLExecutionProvider", "CPUExecutionProvider"],
        "auto": ["CUDAExecutionProvider", "CoreMLExecutionProvider", "CPUExecutionProvider"],
    }[config.device.type]


class SentenceTransformersEngine(EmbeddingEngine):
    name = "sentence-transformers"
    features = frozenset({Feature.TOKEN_INPUT})  # token ids are decoded with the model's own tokenizer

    def __init__(self, config: SentenceTransformersModelConfig, files: ModelFiles) -> None:
        super().__init__(config, files)
        folder = model_folder(files)
        runner: _TorchRunner | _OnnxRunner
        if config.backend == "onnx":
            runner = _OnnxRunner(
                folder,
                config.file_name,
                config.device.threads,
                onnx_providers(config),
                auto=config.device.type == "auto" and config.providers is None,
            )
        else:
            runner = _TorchRunner(folder, config.device.threads, torch_device(config), config.dtype)
        self._runner = runner
        self.dimension = runner.dimension
        self.max_seq_length = runner.max_seq_length
        # a private copy that neither truncates nor pads: for counting and length checks
        self._counter = runner.tokenizer_copy()
        self._counter.no_truncation()
        self._counter.no_padding()
        self._vocab_size = self._counter.get_vocab_size(with_added_tokens=True)
        # inputs per forward pass: a request larger than this is cut up here (by length, to pad little);
        # never below MIN_CHUNK, so a model with batching off still encodes one big request efficiently
        self._chunk = max(config.max_batch_size, MIN_CHUNK)
        log.info(
            "loaded %s (%s backend, %d dimensions, max %d tokens)",
            folder,
            config.backend,
            self.dimension,
            self.max_seq_length,
        )

    def placement(self, _: object = None) -> dict[str, Any]:
        return self._runner.placement()

    @classmethod
    def config_warnings(cls, config: SentenceTransformersModelConfig) -> list[tuple[str, str]]:
        if config.device.type != "cuda":
            return []
        if config.backend == "onnx":
            import onnxruntime

            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                return [("device", "cuda asked, but this onnxruntime has no CUDAExecutionProvider: loading will fail")]
            return []
        import torch

        if not torch.cuda.is_available():
            return [("device", "cuda asked, but torch sees no CUDA device here: loading will fail (503)")]
        return []

    def close(self) -> None:
        self._runner.close()

    # ----------------------------------------------------------------------------------------- embed

    def embed(self, job: EmbeddingJob) -> EmbeddingResult:
        texts = [self._text(index, item) for index, item in enumerate(job.inputs)]
        lengths = [len(encoding.ids) for encoding in self._counter.encode_batch(texts)]
        if not self.config.truncate:
            self._check_lengths(job, lengths)
        vectors = self._encode(texts, lengths)
        counts = [min(length, self.max_seq_length) for length in lengths]
        return EmbeddingResult(vectors=vectors, token_counts=counts)

    def _text(self, index: int, item: str | tuple[int, ...]) -> str:
        if isinstance(item, str):
            return item
        bad = next((t for t in item if not 0 <= t < self._vocab_size), None)
        if bad is not None:
            raise InvalidRequest(
                f"input[{index}] has token id {bad}, outside this model's vocabulary (0 to {self._vocab_size - 1})",
                param="input",
                code="invalid_value",
            )
        # special tokens ([CLS], [SEP]) are dropped: tokenizing the text adds them back where they belong
        text = self._counter.decode(list(item), skip_special_tokens=True)
        if not text.strip():
            raise InvalidRequest(
                f"input[{index}]: the token ids decode to empty text with this model's tokenizer",
                param="input",
                code="invalid_value",
            )
        return text

    def _check_lengths(self, job: EmbeddingJob, lengths: Sequence[int]) -> None:
        for index, length in enumerate(lengths):
            if length > self.max_seq_length:
                name, param = job.name_of(index)
                raise InvalidRequest(
                    f"{name} is {length} tokens long, but this model takes at most {self.max_seq_length} "
                    "tokens (truncate is off for this model)",
                    param=param,
                    code="context_length_exceeded",
                )

    def _encode(self, texts: list[str], lengths: Sequence[int]) -> np.ndarray:
        """Embed in chunks of similar length, so short inputs are not padded to the longest one."""
        order = np.argsort(lengths, kind="stable")
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        for start in range(0, len(texts), self._chunk):
            picked = order[start : start + self._chunk]
            out[picked] = self._runner.encode([texts[i] for i in picked])
        return out


# ------------------------------------------------------------------------------------------- backends


class _TorchRunner:
    """The folder on sentence-transformers and torch."""

    def __init__(self, folder: Path, threads: int | None, device: str | None, dtype: str) -> None:
        try:
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise ModelUnavailable(
                f"backend torch needs sentence-transformers and torch: pip install 'lllmsd[sentence-transformers]' "
                f"({exc})"
            ) from exc
        if threads is not None:
            # torch's intra-op pool is process-wide: this also sets it for other torch models in the daemon
            torch.set_num_threads(threads)
        try:
            self.model = SentenceTransformer(
                str(folder),
                device=device,
                local_files_only=True,
                backend="torch",
                model_kwargs={"dtype": getattr(torch, dtype)},
            )
        except OSError as exc:
            raise ModelUnavailable(f"cannot load the sentence-transformers folder {folder}: {exc}") from exc
        except (RuntimeError, AssertionError) as exc:  # "Torch not compiled with CUDA enabled", no such GPU
            raise ModelUnavailable(f"sentence-transformers cannot use device {device!r}: {exc}") from exc
        self.dimension = int(self.model.get_embedding_dimension() or 0)
        self.max_seq_length = int(self.model.max_seq_length or DEFAULT_MAX_SEQ_LENGTH)
        self._torch = torch

    def tokenizer_copy(self) -> Any:
        from tokenizers import Tokenizer

        backend = getattr(self.model.tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ModelUnavailable("the model's tokenizer is not a fast (tokenizers) tokenizer: it cannot count tokens")
        return Tokenizer.from_str(backend.to_str())

    def encode(self, texts: list[str]) -> np.ndarray:
        with self._torch.inference_mode():
            return self.model.encode(
                texts, batch_size=len(texts), convert_to_numpy=True, show_progress_bar=False
            ).astype(np.float32, copy=False)

    def placement(self) -> dict[str, Any]:
        weights = next(self.model.parameters())
        return {"backend": "torch", "device": str(weights.device), "dtype": str(weights.dtype).removeprefix("torch.")}

    def close(self) -> None:
        del self.model


class _OnnxRunner:
    """An ONNX export of the transformer on onnxruntime; pooling and normalisation done here."""

    def __init__(
        self, folder: Path, file_name: str | None, threads: int | None, providers: list[str], *, auto: bool
    ) -> None:
        try:
            import onnxruntime
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ModelUnavailable(
                f"backend onnx needs onnxruntime and tokenizers: pip install 'lllmsd[sentence-transformers]' ({exc})"
            ) from exc
        model_file = _onnx_file(folder, file_name)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelUnavailable(f"{folder} has no tokenizer.json, which backend onnx needs")
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # idle onnxruntime threads spin by default, taking the CPU the event loop needs between batches
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = onnxruntime.get_available_providers()
        usable = [p for p in providers if p in available]
        if not usable or (not auto and providers[0] not in available):
            # the device asked for is not there (onnxruntime would fall back to the CPU without a word)
            raise ModelUnavailable(
                f"this onnxruntime build offers {', '.join(available)}, not {providers[0]} (a GPU needs the "
                "onnxruntime-gpu package: see docs/accelerators.md)"
            )
        self.session = onnxruntime.InferenceSession(str(model_file), sess_options=options, providers=usable)
        self._inputs = {i.name for i in self.session.get_inputs()}
        self.max_seq_length = _max_seq_length(folder)
        self.pooling, pooled_dimension = _pooling(folder)
        self.normalize = _has_module(folder, "Normalize")
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        # the folder's tokenizer.json may carry fixed padding and another truncation length: replace them
        self.tokenizer.enable_truncation(self.max_seq_length)
        self.tokenizer.enable_padding(pad_id=_pad_id(self.tokenizer), pad_token=_pad_token(self.tokenizer))
        output_dimension = self.session.get_outputs()[0].shape[-1]
        self.dimension = int(output_dimension if isinstance(output_dimension, int) else pooled_dimension or 0)
        if not self.dimension:
            self.dimension = int(self.encode(["dimension probe"]).shape[1])
        log.info("onnx model %s, pooling %s, normalize %s", model_file, self.pooling, self.normalize)

    def tokenizer_copy(self) -> Any:
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.tokenizer.to_str())

    def encode(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.array([e.type_ids for e in encodings], dtype=np.int64)
        output = self.session.run(None, {k: v for k, v in feeds.items() if k in self._inputs})[0]
        # an export that already pools has a (batch, dimension) output; a bare transformer has token states
        vectors = output if output.ndim == 2 else _pool(output, mask, self.pooling)
        if self.normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.where(norms == 0, 1, norms)
        return vectors.astype(np.float32, copy=False)

    def placement(self) -> dict[str, Any]:
        providers = self.session.get_providers()
        device = "cuda" if "CUDAExecutionProvider" in providers[:1] else "cpu"
        return {"backend": "onnxruntime", "device": device, "providers": providers}

    def close(self) -> None:
        del self.session


# -------------------------------------------------------------------------------------- folder reading


def model_folder(files: ModelFiles) -> Path:
    path = files.path
    if path is None or not path.is_dir():
        raise ModelUnavailable(f"a sentence-transformers model is a folder; {path} is not one")
    return path


def _onnx_file(folder: Path, file_name: str | None) -> Path:
    candidates = (file_name,) if file_name else DEFAULT_ONNX_FILES
    for name in candidates:
        if (folder / name).is_file():
            return folder / name
    found = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.onnx"))
    hint = f"; it has {', '.join(found)}: choose one with file_name" if found else "; it has no .onnx file"
    raise ModelUnavailable(f"{folder} has no {' or '.join(candidates)}{hint}")


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"cannot read {path}: {exc}") from exc


def _modules(folder: Path) -> list[dict[str, Any]]:
    return _json(folder / "modules.json") or []


def _has_module(folder: Path, kind: str) -> bool:
    return any(str(m.get("type", "")).endswith(f".{kind}") for m in _modules(folder))


def _max_seq_length(folder: Path) -> int:
    config = _json(folder / "sentence_bert_config.json") or {}
    if config.get("max_seq_length"):
        return int(config["max_seq_length"])
    tokenizer_config = _json(folder / "tokenizer_config.json") or {}
    limit = tokenizer_config.get("model_max_length")
    return int(limit) if isinstance(limit, int) and limit < 1_000_000 else DEFAULT_MAX_SEQ_LENGTH


def _pooling(folder: Path) -> tuple[str, int | None]:
    module = next((m for m in _modules(folder) if str(m.get("type", "")).endswith(".Pooling")), None)
    config = _json(folder / module.get("path", "1_Pooling") / "config.json") if module else None
    if not config:
        return "mean", None
    dimension = config.get("word_embedding_dimension")
    for mode in ("mean_tokens", "cls_token", "max_tokens"):
        if config.get(f"pooling_mode_{mode}"):
            return mode.split("_")[0], dimension
    modes = [k for k, v in config.items() if k.startswith("pooling_mode_") and v]
    raise ModelUnavailable(f"{folder}: pooling {', '.join(modes) or 'none'} is not supported with backend onnx")


def _pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    if mode == "cls":
        return hidden[:, 0]
    weights = mask[:, :, None].astype(hidden.dtype)
    if mode == "max":
        return np.where(weights > 0, hidden, -np.inf).max(axis=1)
    return (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)


def _pad_token(tokenizer: Any) -> str:
    padding = tokenizer.padding
    if padding and padding.get("pad_token"):
        return str(padding["pad_token"])
    return "[PAD]" if tokenizer.token_to_id("[PAD]") is not None else "<pad>"


def _pad_id(tokenizer: Any) -> int:
    padding = tokenizer.padding
    if padding and padding.get("pad_id") is not None:
        return int(padding["pad_id"])
    token_id = tokenizer.token_to_id(_pad_token(tokenizer))
    return int(token_id) if token_id is not None else 0
