"""llama-cpp with ``slots``: several requests on one instance, their tokens evaluated in one batch per step.

The text contract suite runs every contract test on a two-slot instance too (``llama-cpp-slots`` in
conftest.py), one request at a time. This module runs requests at once, on SmolLM2: answers are the same
as alone, steps share rounds, each conversation finds its own slot's KV cache, and a request cancelled
mid-answer leaves the other one running.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any

import llama_cpp
import numpy as np
import pytest
import pytest_asyncio

from lllmsd.core.instance import ModelInstance
from lllmsd.core.jobs import ChatJob, ChatMessage, Sampling, TextDelta, Usage, collect_generation
from lllmsd.engines.base import ModelFiles
from lllmsd.engines.llama_cpp.context import SharedBatch
from lllmsd.engines.llama_cpp.memory import gguf_estimate
from lllmsd.engines.llama_cpp.model import share_context
from lllmsd.engines.llama_cpp.rounds import Step
from tests.engines.conftest import engine_of, load_instance, model_config
from tests.setup_models import model_path

pytestmark = pytest.mark.engines

PROMPTS = ("Tell me about cats.", "What is the capital of France?", "Write a haiku about rain.")


def slots_model(slots: int) -> dict[str, Any]:
    return {
        "task": "text-completion",
        "engine": "llama-cpp",
        "location": str(model_path("smollm2")),
        "slots": slots,
        "context_size": 1024,
        "device": {"threads": 1, "batch_threads": 1},
    }


def greedy(text: str, tokens: int = 24, history: tuple[ChatMessage, ...] = ()) -> ChatJob:
    return ChatJob((*history, ChatMessage(role="user", content=text)), Sampling(max_tokens=tokens, temperature=0))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def in_thread() -> AsyncIterator[ModelInstance]:
    """Three slots on the daemon's side (isolation: thread), so the test can read the engine's rounds."""
    instance = await load_instance(slots_model(3), isolation="thread")
    try:
        yield instance
    finally:
        await instance.dispose()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def in_worker() -> AsyncIterator[ModelInstance]:
    """Two slots in a worker process, as the daemon runs them: the worker runs each call on a thread."""
    instance = await load_instance(slots_model(2))
    try:
        yield instance
    finally:
        await instance.dispose()


async def answer(instance: ModelInstance, job: ChatJob) -> tuple[str, Usage]:
    events = [event async for event in instance.generate(job)]
    result = collect_generation(events, 1)
    return result.choices[0].text, result.usage


@pytest.mark.asyncio(loop_scope="module")
async def test_answers_at_once_are_the_answers_alone_and_share_rounds(in_thread: ModelInstance) -> None:
    engine = engine_of(in_thread)
    alone = [(await answer(in_thread, greedy(p)))[0] for p in PROMPTS]
    rounds_before = engine._slots.rounds.rounds_run
    together = await asyncio.gather(*(answer(in_thread, greedy(p)) for p in PROMPTS))
    assert [text for text, _ in together] == alone
    steps = sum(usage.completion_tokens for _, usage in together)  # one step per token after the first
    assert engine._slots.rounds.rounds_run - rounds_before < steps  # several sequences went into one decode


@pytest.mark.asyncio(loop_scope="module")
async def test_each_conversation_finds_its_own_slot(in_worker: ModelInstance) -> None:
    """Two conversations that share a system prompt take turns on a two-slot instance: each follow-up
    reuses its own first turn from the KV cache, neither evicts the other."""
    system = ChatMessage(role="system", content="You are a helpful assistant who answers briefly.")
    turns = {}
    for topic in ("cats", "ships"):
        job = greedy(f"Say one thing about {topic}.", 12, (system,))
        text, usage = await answer(in_worker, job)
        turns[topic] = (job, text, usage.prompt_tokens)
    for topic, (job, text, first_prompt) in turns.items():
        history = (*job.messages, ChatMessage(role="assistant", content=text))
        _, usage = await answer(in_worker, greedy("And one more?", 8, history))
        assert usage.cached_tokens >= first_prompt, topic


@pytest.mark.asyncio(loop_scope="module")
async def test_a_request_cancelled_mid_answer_leaves_the_other_running(in_worker: ModelInstance) -> None:
    long = greedy("Write a long story about a dragon who lives in a castle by the sea.", 120)
    alone, _ = await answer(in_worker, greedy(PROMPTS[1]))
    seen = threading.Event()

    async def cancelled() -> int:
        count = 0
        async with contextlib.aclosing(in_worker.generate(long)) as events:
            async for event in events:
                count += isinstance(event, TextDelta)
                if count == 3:
                    seen.set()
                    break  # closing the stream cancels the call
        return count

    async def other() -> str:
        await asyncio.to_thread(seen.wait, 60)
        text, _ = await answer(in_worker, greedy(PROMPTS[1]))
        return text

    count, text = await asyncio.gather(cancelled(), other())
    assert count == 3
    assert text == alone
    assert in_worker.host.dead is None


@pytest.mark.asyncio(loop_scope="module")
async def test_each_slot_has_the_context_size_and_the_estimate_counts_every_slots_cache(
    in_thread: ModelInstance,
) -> None:
    estimate = gguf_estimate(model_config(slots_model(3)), ModelFiles(model_path("smollm2")), embedding=False)
    one_slot = gguf_estimate(model_config(slots_model(1)), ModelFiles(model_path("smollm2")), embedding=False)
    placement = in_thread.placement or {}
    assert (placement["context_size"], placement["slots"], in_thread.host.context_size) == (1024, 3, 1024)
    assert estimate.kv_cache == 3 * one_slot.kv_cache
    assert placement["buffers"]["CPU KV"] == pytest.approx(estimate.kv_cache, rel=0.01)  # what llama.cpp allocated


def test_a_round_is_laid_out_in_ascending_sequence_order() -> None:
    """With a KV cache per sequence, llama.cpp evaluates a batch in sub-batches of consecutive sequence ids
    taken in the order they come: a round whose steps arrived as [2, 0, 1] must be laid out as [0, 1, 2] to
    cost one graph evaluation, not two. Each step's logits are still its own sequence's."""
    llama = llama_cpp.Llama(str(model_path("smollm2")), n_ctx=3 * 256, n_threads=1, verbose=False)
    share_context(llama, 3)
    shared = SharedBatch(llama, 64)
    try:
        prompts = {seq: llama.tokenize(f"Sequence {seq} says hello.".encode()) for seq in (2, 0, 1)}
        steps = [Step(seq, tokens, 0) for seq, tokens in prompts.items()]
        shared.decode(steps)
        batch = shared._batch
        laid_out = [batch.seq_id[i][0] for i in range(batch.n_tokens)]
        assert laid_out == sorted(laid_out)
        for step in steps:
            assert batch.seq_id[step.index][0] == step.seq
        # the logits each step reads are those of its own prompt, evaluated alone
        rows = {
            step.seq: np.ctypeslib.as_array(
                llama_cpp.llama_get_logits_ith(llama.ctx, step.index), (llama.n_vocab(),)
            ).copy()
            for step in steps
        }
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llama.ctx), True)
        for seq, tokens in prompts.items():
            alone = Step(seq, tokens, 0)
            shared.decode([alone])
            row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llama.ctx, alone.index), (llama.n_vocab(),))
            assert np.allclose(row, rows[seq], atol=0.05), (seq, float(np.abs(row - rows[seq]).max()))
            others = [other for other in rows if other != seq]
            assert not any(np.allclose(row, rows[other], atol=0.05) for other in others)
    finally:
        shared.close()
        llama.close()
