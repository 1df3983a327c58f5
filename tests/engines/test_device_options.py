"""Every device and memory option reaches the library: asserted on the real libraries' objects after a
real load (llama_cpp.Llama's model and context params, CTranslate2's Whisper, the torch module and the
onnxruntime session), not on mocks of lllmsd's code. This machine has no GPU and CPU-only builds: a GPU
asked of them is either a warning and a CPU instance that serves (llama.cpp's gpu_layers) or a clear
load error (a cuda device), as docs/accelerators.md says."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import wave

import aiohttp
import llama_cpp
import pytest

from lllmsd.core.jobs import ChatJob, ChatMessage, ChoiceEnd, Sampling, TextDelta
from lllmsd.engines.base import ModelFiles
from lllmsd.engines.faster_whisper import FasterWhisperEngine
from lllmsd.engines.llama_cpp.embedding import LlamaCppEmbeddingEngine
from lllmsd.engines.llama_cpp.text import LlamaCppTextEngine
from lllmsd.engines.sentence_transformers import SentenceTransformersEngine
from lllmsd.errors import ModelUnavailable
from tests.conftest import AppFactory, make_config
from tests.engines.conftest import model_config
from tests.setup_models import model_path

pytestmark = pytest.mark.engines


def _llama(**options: object) -> dict[str, object]:
    return {
        "task": "text-completion",
        "engine": "llama-cpp",
        "location": str(model_path("smollm2")),
        "context_size": 1024,
        "device": {"threads": 1, "batch_threads": 1},
        **options,
    }


def test_llama_cpp_options_reach_llama_and_a_cpu_build_serves_with_gpu_layers_all() -> None:
    config = model_config(
        _llama(
            gpu_layers=-1,
            main_gpu=0,
            split_mode="none",
            tensor_split=[1.0],
            flash_attn=True,
            cache_type_k="q8_0",
            cache_type_v="q4_0",
            offload_kqv=False,
            use_mmap=False,
            use_mlock=False,
            batch_size=256,
            ubatch_size=64,
        )
    )
    engine = LlamaCppTextEngine(config, ModelFiles(model_path("smollm2")))
    try:
        llama = engine._llama
        model, context = llama.model_params, llama.context_params
        assert model.n_gpu_layers == 0x7FFFFFFF  # llama-cpp-python's "all layers"
        assert model.main_gpu == 0
        assert model.split_mode == llama_cpp.LLAMA_SPLIT_MODE_NONE
        assert model.tensor_split[0] == pytest.approx(1.0)
        assert model.load_mode == llama_cpp.LLAMA_LOAD_MODE_NONE  # no mmap, no mlock
        assert context.n_ctx == 1024
        assert (context.n_batch, context.n_ubatch) == (256, 64)
        assert context.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        assert (context.type_k, context.type_v) == (llama_cpp.GGML_TYPE_Q8_0, llama_cpp.GGML_TYPE_Q4_0)
        assert context.offload_kqv is False

        report = engine.placement()
        assert llama_cpp.llama_supports_gpu_offload() is False, "this test is written for a CPU-only build"
        assert report["device"] == "cpu"
        assert report["layers_offloaded"] == 0
        assert report["layers_total"] == 31  # 30 blocks and the output layer, as llama.cpp counts
        assert (report["cache_type_k"], report["cache_type_v"], report["context_size"]) == ("q8_0", "q4_0", 1024)
        # the buffers are llama.cpp's own report of what it allocated: no mapped model buffer without mmap
        assert "CPU_Mapped model" not in report["buffers"]
        assert report["buffers"]["CPU model"] > 90 * 2**20
        assert report["buffers"]["CPU KV"] > 0
        assert report["device_memory"] == 0
        (note,) = report["notes"]
        assert "no GPU backend" in note
        assert "make install ACCEL=cuda" in note

        job = ChatJob(messages=(ChatMessage(role="user", content="Hi"),), sampling=Sampling(max_tokens=4, seed=1))
        events = list(engine.chat(job, threading.Event()))
        assert any(isinstance(e, TextDelta) and e.text for e in events)
        assert any(isinstance(e, ChoiceEnd) for e in events)
    finally:
        engine.close()


def test_llama_cpp_defaults_map_the_model_and_keep_f16_cache() -> None:
    engine = LlamaCppTextEngine(model_config(_llama()), ModelFiles(model_path("smollm2")))
    try:
        model, context = engine._llama.model_params, engine._llama.context_params
        assert model.n_gpu_layers == 0
        assert model.load_mode == llama_cpp.LLAMA_LOAD_MODE_MMAP
        assert (context.type_k, context.type_v) == (llama_cpp.GGML_TYPE_F16, llama_cpp.GGML_TYPE_F16)
        report = engine.placement()
        assert report["notes"] == []
        assert report["buffers"]["CPU_Mapped model"] > 90 * 2**20
        # llama.cpp's KV report matches the shape: 30 layers x 1024 cells x 3 heads x 64 x (K + V) x 2 bytes
        assert report["buffers"]["CPU KV"] == 30 * 1024 * 3 * 64 * 2 * 2
    finally:
        engine.close()


def test_llama_cpp_embedding_engine_takes_the_same_options() -> None:
    config = model_config({**_llama(cache_type_k="q8_0", use_mmap=False), "task": "embedding", "context_size": 256})
    engine = LlamaCppEmbeddingEngine(config, ModelFiles(model_path("smollm2")))
    try:
        context = engine._llama.context_params
        assert context.type_k == llama_cpp.GGML_TYPE_Q8_0
        assert context.n_ubatch == 256
        assert engine._llama.model_params.load_mode == llama_cpp.LLAMA_LOAD_MODE_NONE
    finally:
        engine.close()


def _whisper(**options: object) -> dict[str, object]:
    return {
        "task": "speech-to-text",
        "engine": "faster-whisper",
        "location": str(model_path("whisper-tiny-en")),
        **options,
    }


def test_faster_whisper_device_and_compute_type_reach_ctranslate2() -> None:
    config = model_config(_whisper(device={"type": "auto", "threads": 1}, compute_type="float32"))
    engine = FasterWhisperEngine(config, ModelFiles(model_path("whisper-tiny-en")))
    try:
        whisper = engine.model.model  # ctranslate2.models.Whisper
        assert (whisper.device, whisper.compute_type, list(whisper.device_index)) == ("cpu", "float32", [0])
        assert engine.placement() == {
            "backend": "ctranslate2",
            "device": "cpu",
            "device_index": [0],
            "compute_type": "float32",
        }
    finally:
        engine.close()


def test_faster_whisper_cuda_without_cuda_is_a_clear_load_error() -> None:
    config = model_config(_whisper(device="cuda", device_index=0))
    assert FasterWhisperEngine.config_warnings(config) == [
        ("device", "cuda asked, but CTranslate2 sees no CUDA device here: loading will fail (503)")
    ]
    with pytest.raises(ModelUnavailable, match="cannot use device 'cuda'"):
        FasterWhisperEngine(config, ModelFiles(model_path("whisper-tiny-en")))


def _minilm(**options: object) -> dict[str, object]:
    return {"task": "embedding", "engine": "sentence-transformers", "location": str(model_path("minilm")), **options}


def test_sentence_transformers_dtype_and_device_reach_torch() -> None:
    import torch

    config = model_config(_minilm(device={"type": "cpu", "threads": 1}, dtype="bfloat16"))
    engine = SentenceTransformersEngine(config, ModelFiles(model_path("minilm")))
    try:
        module = engine._runner.model
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
        assert module.device.type == "cpu"
        assert engine.placement() == {"backend": "torch", "device": "cpu", "dtype": "bfloat16"}
    finally:
        engine.close()


def test_sentence_transformers_cuda_without_cuda_is_a_clear_load_error() -> None:
    config = model_config(_minilm(device="cuda"))
    assert SentenceTransformersEngine.config_warnings(config)
    with pytest.raises(ModelUnavailable, match="cannot use device 'cuda:0'"):
        SentenceTransformersEngine(config, ModelFiles(model_path("minilm")))


def test_onnx_providers_reach_the_session_and_a_missing_one_is_an_error() -> None:
    onnx = {
        "backend": "onnx",
        "file_name": "onnx/model_qint8.onnx",
        "location": str(model_path("minilm-onnx")),
        "device": {"threads": 1},
    }
    config = model_config(_minilm(**onnx, providers=["CPUExecutionProvider"]))
    engine = SentenceTransformersEngine(config, ModelFiles(model_path("minilm-onnx")))
    try:
        assert engine._runner.session.get_providers() == ["CPUExecutionProvider"]
        assert engine.placement()["providers"] == ["CPUExecutionProvider"]
    finally:
        engine.close()
    cuda = model_config(_minilm(**{**onnx, "device": "cuda"}))
    with pytest.raises(ModelUnavailable, match="not CUDAExecutionProvider"):
        SentenceTransformersEngine(cuda, ModelFiles(model_path("minilm-onnx")))


async def test_the_daemon_serves_gpu_layers_all_on_a_cpu_build_and_says_why_once(
    start_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config({"chat": _llama(gpu_layers=-1, max_instances=2, min_instances=2)})
    with caplog.at_level(logging.INFO, logger="lllmsd.core.pool"):
        client = await start_app(config)
        body = {"model": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status == 200, await response.text()
        assert (await response.json())["choices"][0]["message"]["content"]
        # the request took the first instance that loaded; the second (min_instances) may still be loading
        for _ in range(600):
            status = await (await client.get("/")).json()
            instances = status["models"]["chat"]["instances"]
            if len(instances) == 2 and all(instance["placement"] for instance in instances):
                break
            await asyncio.sleep(0.1)
    assert len(instances) == 2
    for instance in instances:  # each in its own worker process, each with llama.cpp's own report
        assert instance["isolation"] == "process"
        assert instance["placement"]["device"] == "cpu"
        assert instance["placement"]["layers_offloaded"] == 0
        assert "no GPU backend" in instance["placement"]["notes"][0]
        assert instance["memory_estimate_source"] == "estimated"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "no GPU backend" in w]) == 1  # once per model, not per instance
    assert sum("ready: backend llama.cpp, device cpu" in r.getMessage() for r in caplog.records) == 2


async def test_a_cuda_device_that_is_not_there_is_a_503_to_the_waiting_request(start_app: AppFactory) -> None:
    client = await start_app(make_config({"stt": _whisper(device="cuda")}))
    form = aiohttp.FormData()
    form.add_field("model", "stt")
    silence = io.BytesIO()
    with wave.open(silence, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(b"\0\0" * 16000)
    form.add_field("file", silence.getvalue(), filename="silence.wav", content_type="audio/wav")
    response = await client.post("/v1/audio/transcriptions", data=form)
    body = await response.json()
    assert response.status == 503, body
    assert "faster-whisper cannot use device 'cuda'" in body["error"]["message"]
    assert (await client.get("/health")).status == 200  # the daemon keeps serving
