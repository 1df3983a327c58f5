"""The GGUF memory estimate against what a real SmolLM2 instance really takes: the resident memory of its
worker process (the whole of what the instance adds to the machine) after a prompt that fills its context,
at two context sizes and two KV cache types, within 25%."""

from __future__ import annotations

import asyncio
import io
import wave

import aiohttp
import pytest

from lllmsd.api.keys import RUNTIME
from lllmsd.core.estimate import files_size
from lllmsd.core.jobs import CompletionJob, Sampling, Usage
from lllmsd.engines.base import ModelFiles
from lllmsd.engines.llama_cpp.memory import gguf_estimate
from tests.api.probe import eventually
from tests.conftest import AppFactory, make_config
from tests.engines.conftest import load_instance, model_config
from tests.setup_models import model_path

pytestmark = pytest.mark.engines

TOLERANCE = 0.25


# Two corners of the estimate rather than every combination (each case loads and fills a fresh instance):
# the larger context with the f16 cache and no flash attention (its score matrices counted), the smaller
# with a quantized cache and flash attention.
@pytest.mark.parametrize(
    ("context", "cache"),
    [
        (1024, {"cache_type_k": "f16", "cache_type_v": "f16"}),
        (512, {"cache_type_k": "q8_0", "cache_type_v": "q8_0"}),
    ],
    ids=["1024-f16", "512-q8_0"],
)
async def test_smollm2_estimate_is_within_25_percent_of_the_rss_it_adds(context: int, cache: dict[str, str]) -> None:
    model = {
        "task": "text-completion",
        "engine": "llama-cpp",
        "location": str(model_path("smollm2")),
        "context_size": context,
        "flash_attn": cache["cache_type_v"] != "f16",  # llama.cpp needs it for a quantized V cache
        "device": {"threads": 1, "batch_threads": 1},  # ggml spin-waits: one thread holds up best on shared CPUs
        **cache,
    }
    estimate = gguf_estimate(model_config(model), ModelFiles(model_path("smollm2")), embedding=False)
    instance = await load_instance(model)
    try:
        placement = instance.placement
        # the estimate's KV term is what llama.cpp itself allocated for that context and type
        assert placement["buffers"]["CPU KV"] == pytest.approx(estimate.kv_cache, rel=0.01)
        prompt = "hello " * (context - 40)  # one token per word: fills the context but for the answer
        job = CompletionJob(prompt=prompt, sampling=Sampling(max_tokens=2, temperature=0))
        events = [event async for event in instance.generate(job)]
        usage = next(e for e in events if isinstance(e, Usage))
        assert usage.prompt_tokens > context * 0.9
        rss = instance.host.memory()["rss_bytes"]
    finally:
        await instance.dispose()
    assert abs(estimate.total - rss) <= TOLERANCE * rss, (
        f"estimate {estimate.total / 2**20:.0f} MiB ({estimate.as_dict()}) vs RSS {rss / 2**20:.0f} MiB"
    )


async def test_an_engine_without_an_estimate_is_measured_after_its_first_load(start_app: AppFactory) -> None:
    """faster-whisper has no estimate of its own: its first instance is counted at its files' size until
    loaded, then at its worker's RSS, and the next instance is counted at that measurement."""
    whisper = {
        "task": "speech-to-text",
        "engine": "faster-whisper",
        "location": str(model_path("whisper-tiny-en")),
        "min_instances": 1,
        "max_instances": 2,
        "device": {"threads": 1},
    }
    client = await start_app(make_config({"stt": whisper}, concurrency=2))
    runtime = client.server.app[RUNTIME]
    pool = runtime.pools["stt"]
    await eventually(lambda: [i.state.value for i in pool.instances] == ["idle"], timeout=120)
    (first,) = pool.instances
    assert first.estimate_source == "measured"
    measured = first.memory_estimate
    # the worker's resident memory (interpreter, CTranslate2, weights), not the files' size
    assert measured != files_size(ModelFiles(model_path("whisper-tiny-en")))
    assert measured > 100 * 2**20
    assert runtime.budget.held_by(first) == measured

    silence = io.BytesIO()
    with wave.open(silence, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(b"\0\0" * 16000 * 2)

    async def transcribe() -> int:
        form = aiohttp.FormData()
        form.add_field("model", "stt")
        form.add_field("file", silence.getvalue(), filename="silence.wav", content_type="audio/wav")
        response = await client.post("/v1/audio/transcriptions", data=form)
        return response.status

    assert await asyncio.gather(transcribe(), transcribe()) == [200, 200]
    assert len(pool.instances) == 2
    second = pool.instances[1]
    assert (second.estimate_source, second.memory_estimate) == ("measured", measured)
    assert runtime.budget.used == 2 * measured
