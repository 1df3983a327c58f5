"""The daemon's configuration: pydantic models, YAML loading and every check a config must pass.

Keys are snake_case; the camelCase names lllms configs use (``minInstances``, ``contextSize``, ...) are
accepted as aliases so an lllms config ports over unchanged. Unknown keys are errors. Every problem is
reported with its YAML path (``models.chat.max_instances: ...``) through ``ConfigError``; all of them at
once, so a user fixes a file in one pass.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from lllmsd.core.download_source import SourceError, source_of
from lllmsd.core.jobs import ChatMessage, ModelTask, Preload, Sampling

if TYPE_CHECKING:
    from lllmsd.engines.registry import EngineRegistry

MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$"


class ConfigError(Exception):
    """A config that cannot be used; ``problems`` are (yaml path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [f"{path}: {message}" if path else message for path, message in self.problems]


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        loc_by_alias=False,
        frozen=True,
    )


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lllmsd"


class ListenConfig(_Section):
    host: str = Field("127.0.0.1", description="Address to listen on. Loopback by default: expose on purpose.")
    port: int = Field(3000, ge=1, le=65535, description="TCP port to listen on.")


class DeviceConfig(_Section):
    threads: int | None = Field(
        None, ge=1, description="CPU threads per instance for generation; null lets the engine choose."
    )
    batch_threads: int | None = Field(
        None, ge=1, description="CPU threads per instance for prompt evaluation; null lets the engine choose."
    )


class _NamedDeviceConfig(DeviceConfig):
    """A device section that also names the device: ``device: cuda`` is short for ``device: {type: cuda}``."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value


class WhisperDeviceConfig(_NamedDeviceConfig):
    type: Literal["cpu", "cuda", "auto"] = Field(
        "cpu",
        description="Where CTranslate2 runs Whisper: cpu, cuda, or auto (CUDA when this CTranslate2 build and "
        "the machine have it, else the CPU). `device: cuda` is short for `device: {type: cuda}`.",
    )


class EmbeddingDeviceConfig(_NamedDeviceConfig):
    type: Literal["cpu", "cuda", "mps", "auto"] = Field(
        "cpu",
        description="Where the model runs: cpu, cuda, mps (Apple) or auto (the first of cuda, mps, cpu that "
        "torch, or for backend onnx onnxruntime, can use). `device: cuda` is short for `device: {type: cuda}`.",
    )
    index: int = Field(0, ge=0, description="Which GPU, when there are several (cuda:INDEX).")


class Gpt4AllDeviceConfig(_NamedDeviceConfig):
    type: str = Field(
        "cpu",
        min_length=1,
        description="gpt4all's device: cpu, gpu (the best one found), kompute, cuda, amd, nvidia, intel, or a "
        "GPU's name as gpt4all lists it. `device: gpu` is short for `device: {type: gpu}`.",
    )


class MessageConfig(_Section):
    role: Literal["system", "user", "assistant"] = Field(description="Message role.")
    content: str = Field(description="Message text.")


class PreloadConfig(_Section):
    messages: list[MessageConfig] | None = Field(
        None, description="Chat messages every new instance evaluates once, so chats starting with them hit the cache."
    )
    prefix: str | None = Field(None, description="Prompt text every new instance evaluates once (completions).")

    def to_preload(self) -> Preload:
        messages = tuple(ChatMessage(role=m.role, content=m.content) for m in self.messages or ())
        return Preload(messages=messages, prefix=self.prefix)


# The voices OpenAI's speech API names; a text-to-speech model answers to all of them unless its config
# lists its own ``voices``.
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse")


class VoiceConfig(_Section):
    speaker: int | str | None = Field(
        None,
        description="The speaker of a multi-speaker voice model, by id or by name; null = the model's default.",
    )


def _openai_voices() -> dict[str, VoiceConfig]:
    return {name: VoiceConfig() for name in OPENAI_VOICES}


class CompletionDefaults(_Section):
    """Applied when a request leaves a value out."""

    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most.")
    temperature: float | None = Field(None, ge=0, le=2, description="Sampling temperature.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int | None = Field(None, ge=0, description="Sample from the k likeliest tokens (0 = off).")
    min_p: float | None = Field(None, ge=0, le=1, description="Minimum token probability relative to the top one.")
    repeat_penalty: float | None = Field(None, gt=0, description="Penalty for repeated tokens (1 = off).")
    repeat_last_n: int | None = Field(None, ge=0, description="How many recent tokens the repeat penalty sees.")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="OpenAI frequency penalty.")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="OpenAI presence penalty.")
    seed: int | None = Field(None, description="Random seed.")
    stop: list[str] | None = Field(None, description="Stop sequences.")

    def apply(self, sampling: Sampling) -> Sampling:
        """``sampling`` with every value the request left out taken from these defaults."""
        values = {}
        for name in type(self).model_fields:
            mine = getattr(self, name)
            theirs = getattr(sampling, name)
            if name == "stop":
                values[name] = theirs if theirs else tuple(mine or ())
            else:
                values[name] = mine if theirs is None else theirs
        return Sampling(**{**_sampling_fields(sampling), **values})


def _sampling_fields(sampling: Sampling) -> dict[str, Any]:
    return {name: getattr(sampling, name) for name in Sampling.__dataclass_fields__}


class ModelBase(_Section):
    """Options every engine shares."""

    task: ModelTask = Field(
        description="What the model is for: text-completion, embedding, speech-to-text, text-to-speech or rerank "
        "(a cross-encoder)."
    )
    # -- where the weights come from (see the model store)
    url: str | None = Field(
        None, description="A https://huggingface.co/ORG/REPO/resolve/REVISION/PATH link to one file."
    )
    repo: str | None = Field(None, description="Hugging Face repository id (ORG/NAME).")
    file: str | None = Field(None, description="File inside `repo` (a single-file model such as a GGUF).")
    revision: str | None = Field(None, description="Branch, tag or commit of `repo` (default main).")
    allow_patterns: list[str] | None = Field(
        None, description="Glob patterns of the files to fetch from `repo` for a whole-folder model."
    )
    location: Path | None = Field(None, description="A local file or folder, used as is and never copied.")
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-fA-F]{64}$", description="Expected SHA-256 of the downloaded file."
    )
    token: SecretStr | None = Field(
        None, description="Hub token for this model, usually written as ${ENV_VAR}; never logged or shown."
    )
    prepare: Literal["on-demand", "blocking", "async"] = Field(
        "async",
        description="When to download: at the first request, before the server listens, or in the background.",
    )
    # -- the instance pool
    context_size: int | None = Field(None, ge=16, description="Context window in tokens; null = the model's own.")
    min_instances: int = Field(0, ge=0, description="Instances loaded at start-up and always kept.")
    max_instances: int = Field(1, ge=1, description="Instances that may exist at once.")
    ttl: float = Field(300, ge=-1, description="Idle seconds before an instance is disposed; 0 = at once, -1 = never.")
    max_waiting: int = Field(64, ge=0, description="Requests that may wait for an instance; more get 429.")
    queue_timeout: float = Field(
        300, gt=0, description="Seconds a request may wait for an instance (not counting downloads) before 503."
    )
    preload: PreloadConfig | None = Field(None, description="Context every new instance evaluates once.")
    completion_defaults: CompletionDefaults = Field(
        default_factory=CompletionDefaults, description="Values used when a request leaves them out."
    )
    device: DeviceConfig = Field(default_factory=DeviceConfig, description="CPU resources per instance.")
    # -- where the engine runs and how long one request may keep it (see docs/hardening.md)
    isolation: Literal["process", "thread"] | None = Field(
        None,
        description="Where each instance's engine runs: `process` (a worker process of its own: a crash in the "
        "engine's C code costs that instance only) or `thread` (inside the daemon); null = the engine's default "
        "(process for every real engine).",
    )
    cancel_grace: float = Field(
        10,
        gt=0,
        description="Seconds a job gets to stop after its client left or its time ran out; a worker process "
        "that has not stopped by then is killed and replaced.",
    )
    max_request_seconds: float | None = Field(
        None,
        gt=0,
        description="Seconds of engine work one request may take; then generation ends (finish_reason "
        "`length`), or an embedding, rerank, transcription or speech fails with 503. null = 600 for text, 120 "
        "for embedding and rerank, 3600 for speech-to-text and 600 for text-to-speech models.",
    )
    # -- embedding models: dynamic batching of concurrent requests (see docs/embeddings.md)
    batch_window_ms: float = Field(
        2,
        ge=0,
        le=1000,
        description="Embedding models: milliseconds an idle model waits for more requests to batch with the "
        "first one (requests arriving while the engine is busy are batched anyway).",
    )
    max_batch_size: int = Field(
        32,
        ge=1,
        description="Embedding models: inputs merged into one engine call at most; 1 disables batching. "
        "A larger single request still runs whole. Rerank models: (query, document) pairs per forward pass.",
    )
    max_inputs: int = Field(
        2048, ge=1, description="Embedding models: inputs one request may carry at most (OpenAI's limit is 2048)."
    )
    truncate: bool = Field(
        True,
        description="Embedding and rerank models: cut inputs (a rerank model: query and document together) "
        "longer than the model's max sequence to fit; false answers 400 naming the input.",
    )
    # -- rerank (see docs/rerank.md)
    rerank_by_cosine: bool = Field(
        True,
        description="Embedding models: also answer /v1/rerank, scoring each document by the cosine similarity "
        "of its embedding to the query's (bi-encoder ranking; a rerank model ranks better); false answers 400.",
    )
    max_rerank_documents: int = Field(
        1000,
        ge=1,
        description="Rerank and embedding models: documents one rerank request may carry at most; more is a 400.",
    )
    token_ids: Literal["openai", "model"] = Field(
        "openai",
        description="What token ids in a request mean (embedding inputs, completion prompts): `openai`, ids of "
        "OpenAI's cl100k_base encoding as OpenAI clients send them (decoded to text, which the model reads "
        "with its own tokenizer; see docs/clients.md); `model`, ids of this model's own vocabulary "
        "(embeddings only).",
    )
    # -- text models: what one request may carry (see docs/hardening.md); more is a 400 naming the limit
    max_messages: int = Field(2048, ge=1, description="Text models: chat messages one request may carry at most.")
    max_prompt_chars: int = Field(
        1_000_000,
        ge=1,
        description="Text models: characters one request's prompt may have at most (chat: every message's "
        "content and tool-call arguments; completions: prompt and suffix), checked before any tokenizing.",
    )
    # -- speech-to-text models: what one upload may hold (see docs/transcription.md); more is a 400
    memory_estimate: ByteSize | None = Field(
        None,
        description="Memory one instance of this model takes, counted against the daemon's `memory_budget` "
        "(bytes, or a size such as `1.5GiB`); null = estimated: GGUF models from the file's metadata (weights, "
        "KV cache for the context size and cache type, compute buffers), other engines measured after their "
        "first load.",
    )
    max_audio_seconds: float = Field(
        7200,
        gt=0,
        description="Speech-to-text models: seconds of audio one upload may hold at most (2 hours); longer "
        "audio is a 400, found while decoding (or from the container's declared duration) before any "
        "transcribing.",
    )
    # -- text-to-speech models (see docs/speech.md)
    voices: dict[str, VoiceConfig] = Field(
        default_factory=_openai_voices,
        description="Text-to-speech models: the voice names a request may ask for, each with its speaker; "
        "another name is a 400 listing these. Default: OpenAI's names (alloy, ash, ballad, coral, echo, fable, "
        "onyx, nova, sage, shimmer, verse), all on the model's default speaker.",
    )

    @field_validator("token", mode="before")
    @classmethod
    def _expand_token(cls, value: Any) -> Any:
        if isinstance(value, str):
            return os.path.expandvars(value)
        return value

    def problems(self) -> list[tuple[str, str]]:
        """Cross-field problems as (field, message); field "" means the model itself. What the engine
        can do is checked against its class's declaration by ``DaemonConfig.problems``."""
        found: list[tuple[str, str]] = []
        if self.min_instances > self.max_instances:
            found.append(("max_instances", f"must be >= min_instances ({self.min_instances} > {self.max_instances})"))
        sources = [name for name in ("url", "repo", "location") if getattr(self, name) is not None]
        if len(sources) > 1:
            found.append(("", f"give one source, not {' and '.join(sources)}"))
        if not sources and self.needs_source():
            found.append(("", "needs a source: url, repo (+ file or allow_patterns) or location"))
        if self.file is not None and self.repo is None:
            found.append(("file", "goes with repo"))
        if self.allow_patterns is not None and self.repo is None:
            found.append(("allow_patterns", "goes with repo"))
        if self.repo is not None and self.file is not None and self.allow_patterns is not None:
            found.append(("allow_patterns", "give file or allow_patterns, not both"))
        if len(sources) == 1:
            found += _source_problems(self)
        if self.preload is not None:
            if self.task is not ModelTask.TEXT_COMPLETION:
                found.append(("preload", "only text-completion models can preload"))
            elif bool(self.preload.messages) == (self.preload.prefix is not None):
                found.append(("preload", "give either messages or prefix"))
        if self.task is not ModelTask.EMBEDDING:
            for name in sorted(self.model_fields_set & _EMBEDDING_ONLY):
                found.append((name, "only embedding models take this option"))
        if self.task not in (ModelTask.EMBEDDING, ModelTask.RERANK):
            for name in sorted(self.model_fields_set & _RANKING):
                found.append((name, "only embedding and rerank models take this option"))
        if self.task is not ModelTask.TEXT_COMPLETION:
            for name in sorted(self.model_fields_set & _TEXT_ONLY):
                found.append((name, "only text-completion models take messages and prompts"))
        if self.task is not ModelTask.SPEECH_TO_TEXT:
            for name in sorted(self.model_fields_set & _STT_ONLY):
                found.append((name, "only speech-to-text models take this option"))
        if self.task is not ModelTask.TEXT_TO_SPEECH:
            for name in sorted(self.model_fields_set & _TTS_ONLY):
                found.append((name, "only text-to-speech models take this option"))
        elif not self.voices:
            found.append(("voices", "list at least one voice"))
        return found

    def needs_source(self) -> bool:
        return True

    def request_seconds(self) -> float:
        """The time budget of one request's engine work: ``max_request_seconds`` or the task's default."""
        if self.max_request_seconds is not None:
            return self.max_request_seconds
        return _DEFAULT_REQUEST_SECONDS[self.task]


# long enough for a long answer, a big batch, a 2-hour recording on a small CPU; short enough that a
# runaway request (a grammar that never lets the model stop) cannot hold an instance for good
_DEFAULT_REQUEST_SECONDS = {
    ModelTask.TEXT_COMPLETION: 600.0,
    ModelTask.EMBEDDING: 120.0,
    ModelTask.SPEECH_TO_TEXT: 3600.0,
    ModelTask.TEXT_TO_SPEECH: 600.0,
    ModelTask.RERANK: 120.0,
}
_EMBEDDING_ONLY = frozenset({"batch_window_ms", "max_inputs", "rerank_by_cosine"})
_RANKING = frozenset({"max_batch_size", "truncate", "max_rerank_documents"})  # embedding and rerank models
_TEXT_ONLY = frozenset({"max_messages", "max_prompt_chars"})
_STT_ONLY = frozenset({"max_audio_seconds"})
_TTS_ONLY = frozenset({"voices"})


def _source_problems(model: ModelBase) -> list[tuple[str, str]]:
    """Names that could escape the cache (``..``, absolute paths) or are not Hub names; sha256 on a folder."""
    try:
        source = source_of(model)
    except SourceError as exc:
        return [(exc.field, exc.message)]
    if model.sha256 is not None and source.kind == "folder":
        return [("sha256", "checks one file: use it with url, repo + file, or a location file")]
    if model.token is not None and _UNSET_VAR.fullmatch(model.token.get_secret_value()):
        return [("token", f"environment variable {model.token.get_secret_value()} is not set")]
    return []


_UNSET_VAR = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?")  # what os.path.expandvars leaves of an unset variable


class FakeModelConfig(ModelBase):
    """The deterministic FakeEngine: no weights needed; for tests and integration tests."""

    engine: Literal["fake"] = Field(description="Engine that runs the model.")
    load_delay: float = Field(0, ge=0, description="Seconds each load takes.")
    token_delay: float = Field(0, ge=0, description="Seconds per generated token.")
    fail_on_load: bool = Field(False, description="Every load raises.")
    fail_after_tokens: int | None = Field(
        None, ge=0, description="Generation raises after this many tokens (null = never)."
    )
    dimensions: int = Field(16, ge=1, le=8192, description="Length of the fake embedding vectors.")
    slots: int = Field(1, ge=1, le=64, description="Requests one instance serves at once.")

    def needs_source(self) -> bool:
        return False


# llama.cpp's KV cache types (ggml types a cache may hold)
KvCacheType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"]


class LlamaCppModelConfig(ModelBase):
    """GGUF models on llama-cpp-python."""

    engine: Literal["llama-cpp"] = Field(description="Engine that runs the model.")
    chat_format: str | None = Field(
        None, description="llama-cpp-python chat format name; null = the GGUF's own chat template."
    )
    grammars: dict[str, str] = Field(
        default_factory=dict, description="Named grammars (GBNF text or a JSON Schema as JSON text)."
    )
    batch_size: int = Field(512, ge=1, description="Prompt tokens evaluated per batch (llama.cpp's n_batch).")
    slots: int = Field(
        1,
        ge=1,
        le=64,
        description="Requests one instance serves at once (text generation): each on a sequence of its own with "
        "context_size tokens, the next tokens of all of them evaluated in one batch per step, as llama-server's "
        "--parallel. Concurrent requests all start at once on one copy of the weights and one compute buffer, each at "
        "a share of its speed; the KV cache grows slots times, and the daemon's `concurrency` cap counts each "
        "request. docs/operations.md compares it with max_instances.",
    )
    tool_format: Literal["auto", "hermes", "llama3", "mistral", "generic"] = Field(
        "auto",
        description="Tool-call syntax: auto = detected from the chat template (docs/tools.md); hermes "
        "(Hermes, Qwen 2.5/3), llama3 (Llama 3.1-3.3), mistral, or generic (instructions in the system prompt).",
    )
    reasoning: Literal["separate", "inline"] = Field(
        "separate",
        description="A thinking model's <think> text: separate = returned as reasoning_content; inline = left "
        "in the content, tags included, for clients that want it raw.",
    )
    ubatch_size: int | None = Field(
        None,
        ge=1,
        description="Tokens per physical batch (n_ubatch): its compute buffer grows with it; null = batch_size.",
    )
    gpu_layers: int = Field(
        0,
        ge=-1,
        description="Layers offloaded to the GPU (n_gpu_layers); -1 = all. Needs a llama-cpp-python built with a "
        "GPU backend (`make install ACCEL=cuda` or `vulkan`); on a CPU-only build the model serves on the CPU and "
        "one warning says why.",
    )
    main_gpu: int = Field(0, ge=0, description="The GPU that holds the model (split_mode none) or its scratch buffers.")
    split_mode: Literal["none", "layer", "row"] = Field(
        "layer",
        description="How the model is spread over several GPUs: none (main_gpu only), layer (whole layers per "
        "GPU) or row (rows of each tensor across GPUs).",
    )
    tensor_split: list[float] | None = Field(
        None, description="Share of the model each GPU takes, e.g. [3, 1]; null = in proportion to free memory."
    )
    flash_attn: bool | None = Field(
        None,
        description="Flash attention: faster decoding (SmolLM2 on 2 CPU cores: +14%, docs/benchmarks.md) and a "
        "smaller compute buffer at long contexts; a quantized V cache needs it. null = on for text generation (as "
        "llama-server has it wherever the device supports it), off for embedding and rerank models (whose scores "
        "then do not depend on what else shares their batch, to the last digit).",
    )
    cache_type_k: KvCacheType = Field(
        "f16", description="KV cache type of keys: f16, or q8_0 / q4_0 / ... for about half / a quarter the memory."
    )
    cache_type_v: KvCacheType = Field(
        "f16", description="KV cache type of values (a quantized type needs flash_attn: true)."
    )
    offload_kqv: bool = Field(True, description="Keep the KV cache and attention on the GPU with offloaded layers.")
    use_mmap: bool = Field(
        True, description="Map the GGUF into memory instead of reading it: pages shared between instances."
    )
    use_mlock: bool = Field(False, description="Lock the weights in RAM so they are never swapped out.")

    @property
    def flash_attention(self) -> bool:
        """Whether the instances use flash attention: ``flash_attn``, or by default for text generation."""
        return self.flash_attn if self.flash_attn is not None else self.task == ModelTask.TEXT_COMPLETION

    def problems(self) -> list[tuple[str, str]]:
        found = super().problems()
        if self.cache_type_v not in ("f16", "f32", "bf16") and not self.flash_attention:
            found.append(("cache_type_v", f"{self.cache_type_v} (a quantized V cache) needs flash_attn: true"))
        if self.tensor_split is not None and (not self.tensor_split or min(self.tensor_split) < 0):
            found.append(("tensor_split", "give one share >= 0 per GPU"))
        if self.slots > 1 and self.task != ModelTask.TEXT_COMPLETION:
            found.append(("slots", "several requests at once on one instance is for text generation only"))
        return found


class Gpt4AllModelConfig(ModelBase):
    """GGUF models on gpt4all's bundled llama.cpp."""

    engine: Literal["gpt4all"] = Field(description="Engine that runs the model.")
    prompt_template: str | None = Field(
        None,
        description=(
            "User turn template with {0} for the message and {1} for the assistant's reply (what follows {1} "
            "ends the reply), e.g. '<|im_start|>user\\n{0}<|im_end|>\\n<|im_start|>assistant\\n{1}<|im_end|>\\n'; "
            "null = derived from the GGUF's chat template (ChatML, Llama 3)."
        ),
    )
    system_template: str | None = Field(
        None, description="System turn template with {0} for the system prompt; null = derived from the GGUF."
    )
    device: Gpt4AllDeviceConfig = Field(  # type: ignore[assignment]
        default_factory=Gpt4AllDeviceConfig, description="Where gpt4all runs the model, and its CPU threads."
    )
    gpu_layers: int = Field(
        100, ge=0, description="Layers gpt4all offloads when `device` is a GPU (its ngl); ignored on the CPU."
    )

    @field_validator("prompt_template", "system_template", mode="after")
    @classmethod
    def _template_has_message(cls, value: str | None) -> str | None:
        if value is not None and "{0}" not in value:
            raise ValueError("must contain {0} where the message goes")
        return value


class SentenceTransformersModelConfig(ModelBase):
    """Sentence-embedding models (sentence-transformers folders)."""

    engine: Literal["sentence-transformers"] = Field(description="Engine that runs the model.")
    backend: Literal["torch", "onnx"] = Field("torch", description="Run on torch or on onnxruntime.")
    device: EmbeddingDeviceConfig = Field(  # type: ignore[assignment]
        default_factory=EmbeddingDeviceConfig, description="Where the model runs, and its CPU threads."
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="backend torch: the weights' type (float16 / bfloat16 halve their memory; GPU)."
    )
    providers: list[str] | None = Field(
        None,
        description="backend onnx: onnxruntime execution providers in order of preference, e.g. "
        "[CUDAExecutionProvider, CPUExecutionProvider]; null = from `device` (CUDA then CPU for cuda).",
    )
    file_name: str | None = Field(
        None,
        description="backend onnx: the ONNX file inside the model folder (default onnx/model.onnx, then "
        "model.onnx), e.g. onnx/model_qint8_avx512.onnx.",
    )

    def problems(self) -> list[tuple[str, str]]:
        found = super().problems()
        if self.file_name is not None and self.backend != "onnx":
            found.append(("file_name", "chooses an ONNX file: it goes with backend: onnx"))
        if self.file_name is not None and (Path(self.file_name).is_absolute() or ".." in Path(self.file_name).parts):
            found.append(("file_name", "must be a path inside the model folder"))
        if self.providers is not None and self.backend != "onnx":
            found.append(("providers", "chooses onnxruntime execution providers: it goes with backend: onnx"))
        if "dtype" in self.model_fields_set and self.backend != "torch":
            found.append(("dtype", "sets torch weights' type: it goes with backend: torch"))
        return found


class FasterWhisperModelConfig(ModelBase):
    """Whisper models in CTranslate2 format on faster-whisper."""

    engine: Literal["faster-whisper"] = Field(description="Engine that runs the model.")
    device: WhisperDeviceConfig = Field(  # type: ignore[assignment]
        default_factory=WhisperDeviceConfig, description="Where CTranslate2 runs the model, and its CPU threads."
    )
    device_index: int | list[int] = Field(
        0, description="Which GPU (or GPUs: a list loads one replica on each) when `device` is cuda."
    )
    compute_type: str = Field(
        "int8",
        description="CTranslate2 compute type: int8 (CPU), float16 or int8_float16 (CUDA), float32, default, auto "
        "(the fastest the device supports); sets the weights' memory.",
    )

    beam_size: int = Field(5, ge=1, description="Beam search width.")
    vad_filter: bool = Field(False, description="Skip silence with the Silero VAD.")


class ResponsesConfig(_Section):
    """The Responses API's state store (see docs/responses.md)."""

    path: Path | None = Field(
        None,
        description="The SQLite file stored responses live in; null = responses.sqlite3 in cache_dir. Restart to "
        "change.",
    )
    max_age: float | None = Field(
        30 * 24 * 3600,
        gt=0,
        description="Seconds a stored response is kept (default 30 days, as OpenAI); null = no age limit.",
    )
    max_count: int | None = Field(
        10_000, ge=1, description="Stored responses kept at most (the oldest go first); null = no count limit."
    )
    store: bool = Field(True, description="Whether a request that does not say `store` is stored.")


class PiperModelConfig(ModelBase):
    """Piper voices (VITS in ONNX, the ``.onnx`` with its ``.onnx.json`` beside it) on piper-tts."""

    engine: Literal["piper"] = Field(description="Engine that runs the model.")
    noise_scale: float | None = Field(
        None,
        ge=0,
        le=2,
        description="Generator noise (variation in the voice); null = the voice's own, 0 = the "
        "same audio for the same text every time.",
    )
    noise_w_scale: float | None = Field(
        None, ge=0, le=2, description="Phoneme width noise (variation in timing); null = the voice's own."
    )
    sentence_silence: float = Field(0.0, ge=0, le=5, description="Seconds of silence added after each sentence.")


MODELS_DESCRIPTION = "The models to serve, by id."
RESPONSES_FILE = "responses.sqlite3"


class DaemonConfig(_Section):
    """The whole config. Parsed through an engine registry (``parse_config``), whose
    ``daemon_config_class`` narrows ``models`` to the config classes of the engines it knows."""

    listen: ListenConfig = Field(default_factory=ListenConfig, description="Where the HTTP API listens.")
    concurrency: int = Field(2, ge=1, description="Engine tasks that may run at once across all models.")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="Where downloaded weights go.")
    api_keys: list[SecretStr] = Field(
        default_factory=list, description="Bearer tokens the API accepts; empty = no authentication."
    )
    max_body_size: int = Field(
        26 * 1024 * 1024, ge=1024, description="Largest request body in bytes (audio uploads included)."
    )
    max_audio_size: int = Field(
        25 * 1024 * 1024,
        ge=1,
        description="Largest audio file one transcription or translation may upload, in bytes (OpenAI's 25 MB); "
        "larger files get 413.",
    )
    shutdown_grace: float = Field(
        30, ge=0, description="Seconds running requests get to finish on shutdown before they are cut."
    )
    client_timeout: float = Field(
        60,
        gt=0,
        description="Seconds a connection may stay idle or take to send its request headers, and a JSON body "
        "may take to arrive (else 408): a slow or stalled client cannot hold a connection forever.",
    )
    max_connections: int = Field(
        1000,
        ge=1,
        description="Client connections held open at most (idle keep-alive ones count). At the cap the least "
        "recently active idle connection is closed to make room; when every one is busy a new connection gets "
        "503 `too_many_connections`. Needs that many open files plus 256 (see docs/hardening.md); restart to "
        "change.",
    )
    responses: ResponsesConfig = Field(
        default_factory=ResponsesConfig, description="Where and for how long the Responses API keeps state."
    )
    session_header: str = Field(
        "X-Session-Id",
        pattern=r"^[A-Za-z0-9-]{1,64}$",
        description="Request header that names a client's conversation. lllmsd echoes it on the response and "
        "sends the session's next turn to the instance that holds the conversation in its cache (the one that "
        "served its last turn, unless another conversation has pushed it out since); a balancer in front of "
        "several daemons hashes on the same header (docs/scale-out.md).",
    )
    memory_budget: int | str | None = Field(
        None,
        description="Memory every model's instances may take together, by their estimates (`memory_estimate`): "
        "bytes, a size (`12GiB`) or a share of the machine's memory (`60%`). A load that would not fit first "
        "disposes the least recently used idle instance of any model, else waits in its model's queue. "
        "null = 75% of the machine's memory (or of the cgroup's limit).",
    )
    models: dict[str, ModelBase] = Field(default_factory=dict, description=MODELS_DESCRIPTION)

    @field_validator("memory_budget", mode="after")
    @classmethod
    def _check_budget(cls, value: int | str | None) -> int | str | None:
        if value is not None:
            parse_memory_budget(value, machine=1)  # raises ValueError with the reason
        return value

    @field_validator("cache_dir", mode="after")
    @classmethod
    def _expand_cache_dir(cls, value: Path) -> Path:
        return Path(os.path.expandvars(str(value))).expanduser()

    def responses_path(self) -> Path:
        """The Responses API's SQLite file: ``responses.path``, else responses.sqlite3 in ``cache_dir``."""
        path = self.responses.path
        return Path(os.path.expandvars(str(path))).expanduser() if path is not None else self.cache_dir / RESPONSES_FILE

    def problems(self, engines: EngineRegistry) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        for index, key in enumerate(self.api_keys):
            if not key.get_secret_value().strip():
                found.append((f"api_keys.{index}", "an API key cannot be empty"))
        for model_id, model in self.models.items():
            prefix = f"models.{model_id}"
            if not re.match(MODEL_ID_PATTERN, model_id):
                found.append((prefix, "model ids are letters, digits and . _ : @ + - (at most 128)"))
            problems = model.problems() + _engine_problems(model, engines)
            found += [(f"{prefix}.{field}" if field else prefix, msg) for field, msg in problems]
        return found

    def warnings(self) -> list[tuple[str, str]]:
        """What is valid but will not work as a reader of the file may expect, as (path, message):
        ``lllmsd config check`` and the daemon's start print them."""
        found = []
        for model_id, model in self.models.items():
            slots = getattr(model, "slots", 1)
            if slots > self.concurrency:
                found.append(
                    (
                        f"models.{model_id}.slots",
                        f"{slots} slots, but the daemon's concurrency is {self.concurrency}: at most "
                        f"{self.concurrency} of its requests run at once (raise concurrency to at least {slots})",
                    )
                )
        return found

    def missing_engines(self, engines: EngineRegistry) -> list[tuple[str, str]]:
        """Models whose engine's libraries are not installed, with the command that installs them."""
        found = []
        for model_id, model in self.models.items():
            spec = engines[model.engine]  # type: ignore[attr-defined]
            missing = spec.missing_modules()
            if missing:
                found.append(
                    (
                        f"models.{model_id}.engine",
                        f"the {spec.name} engine needs {', '.join(missing)}: run {spec.install_hint()}",
                    )
                )
        return found


def _engine_problems(model: ModelBase, engines: EngineRegistry) -> list[tuple[str, str]]:
    """What the model's engine class declares it can do, and its own checks of the options (a chat format
    it does not know), before any weights load. Skipped when the engine's libraries are missing: that
    is reported on its own, with the command that installs them."""
    spec = engines[model.engine]  # type: ignore[attr-defined]
    if spec.missing_modules():
        return []
    try:
        engine_class = spec.class_for(model.task)
    except LookupError as exc:
        return [("task", str(exc))]
    problems: list[tuple[str, str]] = engine_class.config_problems(model)
    return problems


# ------------------------------------------------------------------------------------------- loading


def _format_loc(loc: tuple[Any, ...], engines: EngineRegistry) -> str:
    parts = [str(p) for p in loc]
    # a discriminated union puts the engine tag into the path (models.chat.fake.ttl): users never wrote it
    if len(parts) >= 3 and parts[0] == "models" and parts[2] in engines:
        del parts[2]
    return ".".join(parts)


def _format_error(error: Mapping[str, Any], engines: EngineRegistry) -> tuple[str, str]:
    path = _format_loc(tuple(error["loc"]), engines)
    kind = error["type"]
    if kind == "extra_forbidden":
        return path, "unknown key"
    if kind == "missing":
        return path, "is required"
    if kind == "union_tag_invalid":
        known = ", ".join(engines)
        return f"{path}.engine", f"unknown engine {error['ctx']['tag']!r} (known: {known})"
    if kind == "union_tag_not_found":
        return f"{path}.engine", f"is required (one of: {', '.join(engines)})"
    message = str(error["msg"])
    if "input" in error and not isinstance(error["input"], dict | list):
        message += f" (got {error['input']!r})"
    return path, message


def default_engines(engines: EngineRegistry | None) -> EngineRegistry:
    if engines is not None:
        return engines
    from lllmsd.engines.registry import builtin_engines  # the registry imports this module's classes

    return builtin_engines()


def parse_config(
    data: Any, *, source: str | None = None, check_installed: bool = True, engines: EngineRegistry | None = None
) -> DaemonConfig:
    """Validate already-parsed YAML/JSON data against the engines of ``engines`` (default: the built-in
    ones); raise ConfigError with every problem found."""
    engines = default_engines(engines)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([("", "the config must be a mapping of keys to values")], source)
    try:
        config = engines.daemon_config_class().model_validate(data)
    except ValidationError as exc:
        raise ConfigError([_format_error(e, engines) for e in exc.errors()], source) from None
    problems = config.problems(engines)
    if check_installed and not problems:
        problems = config.missing_engines(engines)
    if problems:
        raise ConfigError(problems, source)
    return config


def parse_memory_budget(value: int | str, *, machine: int) -> int:
    """``memory_budget`` in bytes: an int, a size (``12GiB``, ``500MB``) or a share of ``machine`` (``60%``)."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            share = float(value.strip()[:-1])
        except ValueError:
            raise ValueError(f"{value!r} is not a percentage") from None
        if not 0 < share <= 100:
            raise ValueError("a share of the machine's memory is between 0% and 100%")
        return int(machine * share / 100)
    try:
        size = int(_BYTE_SIZE.validate_python(value))
    except ValidationError:
        raise ValueError(f"{value!r} is not a size: give bytes, a size such as 12GiB, or a share such as 60%") from None
    if size <= 0:
        raise ValueError("must be more than 0")
    return size


_BYTE_SIZE: TypeAdapter[ByteSize] = TypeAdapter(ByteSize)


API_KEYS_ENV = "LLLMSD_API_KEYS"


def with_env_api_keys(config: DaemonConfig, environ: Mapping[str, str]) -> DaemonConfig:
    """``config`` plus the comma-separated keys in $LLLMSD_API_KEYS, so keys can stay out of the file
    (systemd's EnvironmentFile, a container secret)."""
    extra = [key.strip() for key in environ.get(API_KEYS_ENV, "").split(",") if key.strip()]
    if not extra:
        return config
    return config.model_copy(update={"api_keys": [*config.api_keys, *(SecretStr(key) for key in extra)]})


def load_config(
    path: str | os.PathLike[str],
    *,
    check_installed: bool = True,
    environ: Mapping[str, str] | None = None,
    engines: EngineRegistry | None = None,
) -> DaemonConfig:
    """Read and validate a YAML config file; $LLLMSD_API_KEYS (from ``environ``) adds API keys."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([("", f"{source}: no such file")], source) from None
    except OSError as exc:
        raise ConfigError([("", f"{source}: cannot read: {exc.strerror}")], source) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([("", f"{source}: invalid YAML{where}: {problem}")], source) from None
    config = parse_config(data, source=source, check_installed=check_installed, engines=engines)
    return with_env_api_keys(config, os.environ if environ is None else environ)


def config_json_schema(engines: EngineRegistry | None = None) -> dict[str, Any]:
    return default_engines(engines).daemon_config_class().model_json_schema(by_alias=False)
