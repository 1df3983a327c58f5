"""The GGUF memory estimate against what a real SmolLM2 instance really takes: the resident memory of its
worker process (the whole of what the instance adds to the machine) after a prompt that fills its context,
at two context sizes and two KV cache types, within 25%."""

from __future__ import annotations

import pytest

from lllmsd.core.jobs import CompletionJob, Sampling, Usage
from lllmsd.engines.base import ModelFiles
from lllmsd.engines.llama_cpp.memory import gguf_estimate
from tests.engines.conftest import load_instance, model_config
from tests.setup_models import model_path

pytestmark = pytest.mark.engines

TOLERANCE = 0.25


@pytest.mark.parametrize("context", [512, 1024])
@pytest.mark.parametrize(
    "cache", [{"cache_type_k": "f16", "cache_type_v": "f16"}, {"cache_type_k": "q8_0", "cache_type_v": "q8_0"}]
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
        placement = await instance.describe()
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
