"""The gpt4all engine on the real SmolLM2 (its pre-tokenizer rewritten for gpt4all), through ModelInstance.

One instance is loaded per module; generation is greedy (temperature 0) wherever a test compares texts.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from lllmsd.core.admission import check_job
from lllmsd.core.instance import ModelInstance
from lllmsd.core.jobs import (
    ChatJob,
    ChatMessage,
    ChoiceEnd,
    CompletionJob,
    GenerationEvent,
    GenerationResult,
    ResponseFormat,
    Sampling,
    TextDelta,
    ToolSpec,
    Usage,
    collect_generation,
)
from lllmsd.engines.base import ModelFiles
from lllmsd.engines.gpt4all import Gpt4AllEngine
from lllmsd.engines.gpt4all_templates import CHATML, LLAMA3, detect_format, format_from_config, read_gguf_info
from lllmsd.errors import ContextLengthExceeded, ModelUnavailable, UnsupportedParameter
from tests.engines.conftest import engine_of, load_instance, model_config
from tests.setup_models import model_path

pytestmark = pytest.mark.engines
# tests on the loaded model share the module's event loop, as the module-scoped instance does
on_model = pytest.mark.asyncio(loop_scope="module")

GREEDY = Sampling(temperature=0, max_tokens=40)
FRANCE = ChatMessage("user", "What is the capital of France?")


def gpt4all_model(**options: Any) -> dict[str, Any]:
    return {
        "task": "text-completion",
        "engine": "gpt4all",
        "location": str(model_path("smollm2-gpt4all")),
        "context_size": 2048,
        "device": {"threads": 1},  # ggml spin-waits: one thread holds up best on shared CPUs
        **options,
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def instance() -> AsyncIterator[ModelInstance]:
    loaded = await load_instance(gpt4all_model(), isolation="thread")
    yield loaded
    await loaded.dispose()


async def events_of(instance: ModelInstance, job: ChatJob | CompletionJob) -> list[GenerationEvent]:
    return [event async for event in instance.generate(job)]


async def run(instance: ModelInstance, job: ChatJob | CompletionJob) -> GenerationResult:
    return collect_generation(await events_of(instance, job))


def chat(*messages: ChatMessage, sampling: Sampling = GREEDY) -> ChatJob:
    return ChatJob(messages=messages, sampling=sampling)


async def reset(instance: ModelInstance) -> None:
    """Leave the instance holding another conversation, so the next one starts from an empty cache."""
    await run(instance, chat(ChatMessage("user", "Hi"), sampling=Sampling(temperature=0, max_tokens=1)))


# ------------------------------------------------------------------------------------------- answers


@on_model
async def test_chat_answers(instance: ModelInstance) -> None:
    result = await run(instance, chat(FRANCE))
    choice = result.choices[0]
    assert "Paris" in choice.text
    assert choice.finish_reason == "stop"


@on_model
async def test_prompt_tokens_are_the_tokenizers_count(instance: ModelInstance) -> None:
    await reset(instance)
    result = await run(instance, chat(FRANCE))
    # <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n is 16 tokens with
    # SmolLM2's tokenizer (the same ids llama.cpp's current tokenizer gives on the original GGUF)
    assert result.usage.prompt_tokens == 16
    assert result.usage.cached_tokens == 0
    assert result.usage.completion_tokens > 0


@on_model
async def test_max_tokens_ends_with_length(instance: ModelInstance) -> None:
    job = chat(
        ChatMessage("user", "Write a long story about a dragon."), sampling=Sampling(temperature=0, max_tokens=5)
    )
    result = await run(instance, job)
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 5
    assert result.choices[0].text


@on_model
async def test_system_prompt_is_honoured(instance: ModelInstance) -> None:
    question = ChatMessage("user", "What is your name?")
    plain = await run(instance, chat(question))
    named = await run(instance, chat(ChatMessage("system", "Your name is Zorblax."), question))
    assert "Zorblax" in named.choices[0].text
    assert "Zorblax" not in plain.choices[0].text
    assert named.usage.prompt_tokens > plain.usage.prompt_tokens


@on_model
async def test_completion(instance: ModelInstance) -> None:
    job = CompletionJob(prompt="The capital of France is", sampling=Sampling(temperature=0, max_tokens=4))
    result = await run(instance, job)
    assert "Paris" in result.choices[0].text
    assert result.choices[0].finish_reason == "length"
    assert result.usage.prompt_tokens == 5
    assert result.usage.completion_tokens == 4


# -------------------------------------------------------------------------------------- stop sequences


@pytest.mark.parametrize("stop", [" Paris", "ris", "is Pa"])
@on_model
async def test_stop_sequence_cuts_before_it(instance: ModelInstance, stop: str) -> None:
    full = (await run(instance, chat(FRANCE))).choices[0].text
    assert stop in full
    events = await events_of(instance, chat(FRANCE, sampling=Sampling(temperature=0, max_tokens=40, stop=(stop,))))
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    text = "".join(deltas)
    assert text == full[: full.index(stop)]
    assert stop not in text
    assert [e.finish_reason for e in events if isinstance(e, ChoiceEnd)] == ["stop"]
    assert isinstance(events[-1], Usage)


@on_model
async def test_follow_up_after_a_stop_inside_a_token_matches_a_fresh_evaluation(instance: ModelInstance) -> None:
    # "ris" cuts inside the token " Paris": the cache gives that token back and evaluates " Pa" as text
    cut = await run(instance, chat(FRANCE, sampling=Sampling(temperature=0, max_tokens=40, stop=("ris",))))
    reply = ChatMessage("assistant", cut.choices[0].text)
    follow_up = chat(FRANCE, reply, ChatMessage("user", "And of Spain?"))
    cached = await run(instance, follow_up)
    assert cached.usage.cached_tokens > 0
    await reset(instance)
    fresh = await run(instance, follow_up)
    assert fresh.usage.cached_tokens == 0
    assert cached.choices[0].text == fresh.choices[0].text


# ------------------------------------------------------------------------------------------ the cache


@on_model
async def test_follow_up_turn_reuses_the_session(instance: ModelInstance) -> None:
    await reset(instance)
    first = await run(instance, chat(FRANCE))
    conversation = (FRANCE, ChatMessage("assistant", first.choices[0].text), ChatMessage("user", "And of Spain?"))
    second = await run(instance, chat(*conversation))
    held = first.usage.prompt_tokens + first.usage.completion_tokens
    assert second.usage.cached_tokens == held
    assert second.usage.prompt_tokens > held
    assert "Madrid" in second.choices[0].text
    # the same conversation evaluated from scratch gives the same answer: the kept session is exact
    await reset(instance)
    fresh = await run(instance, chat(*conversation))
    assert fresh.usage.cached_tokens == 0
    assert fresh.usage.prompt_tokens == second.usage.prompt_tokens
    assert fresh.choices[0].text == second.choices[0].text


@on_model
async def test_a_conversation_that_does_not_extend_the_session_resets_it(instance: ModelInstance) -> None:
    first = await run(instance, chat(FRANCE))
    edited = (FRANCE, ChatMessage("assistant", first.choices[0].text + " Indeed."), ChatMessage("user", "Why?"))
    assert (await run(instance, chat(*edited))).usage.cached_tokens == 0
    other = await run(instance, chat(ChatMessage("user", "What is the capital of Italy?")))
    assert other.usage.cached_tokens == 0
    # asking the same question again is not an extension either
    again = await run(instance, chat(ChatMessage("user", "What is the capital of Italy?")))
    assert again.usage.cached_tokens == 0
    assert again.choices[0].text == other.choices[0].text


@on_model
async def test_preload_is_cached_for_conversations_that_start_with_it() -> None:
    system = ChatMessage("system", "You are a helpful geography teacher.")
    loaded = await load_instance(
        gpt4all_model(preload={"messages": [{"role": "system", "content": system.content}]}), isolation="thread"
    )
    try:
        # <|im_start|>system\nYou are a helpful geography teacher.<|im_end|>\n is 12 SmolLM2 tokens
        assert loaded.cached_tokens == 12
        result = await run(loaded, chat(system, FRANCE))
        assert result.usage.cached_tokens == 12
        assert "Paris" in result.choices[0].text
    finally:
        await loaded.dispose()


# ------------------------------------------------------------------------------------ cancel and limits


@on_model
async def test_cancel_stops_within_one_token(instance: ModelInstance) -> None:
    engine = engine_of(instance)
    job = chat(
        ChatMessage("user", "Write a long story about a dragon."), sampling=Sampling(temperature=0, max_tokens=200)
    )

    def consume() -> list[GenerationEvent]:
        cancel = threading.Event()
        seen: list[GenerationEvent] = []
        for event in engine.chat(job, cancel):
            seen.append(event)
            cancel.set()  # at the first token
        return seen

    seen = await instance.host.run(consume)
    # the engine hands out one token at a time: cancel set while handling the first stops the second
    assert len(seen) == 1
    assert isinstance(seen[0], TextDelta)
    # the engine is usable afterwards, and the prompt it kept is a cache for the same start only
    assert "Paris" in (await run(instance, chat(FRANCE))).choices[0].text


@on_model
async def test_cancel_during_prompt_evaluation_ends_quietly(instance: ModelInstance) -> None:
    engine = engine_of(instance)
    cancel = threading.Event()
    cancel.set()
    seen = await instance.host.run(lambda: list(engine.chat(chat(FRANCE), cancel)))
    assert seen == []
    # the half-evaluated prompt is not mistaken for a cache
    result = await run(instance, chat(FRANCE))
    assert result.usage.cached_tokens == 0
    assert "Paris" in result.choices[0].text


@on_model
async def test_closing_the_stream_early_frees_the_instance(instance: ModelInstance) -> None:
    job = chat(
        ChatMessage("user", "Write a long story about a dragon."), sampling=Sampling(temperature=0, max_tokens=200)
    )
    stream = instance.generate(job)
    first = await anext(stream)
    assert isinstance(first, TextDelta)
    await asyncio.wait_for(stream.aclose(), timeout=30)
    assert "Paris" in (await run(instance, chat(FRANCE))).choices[0].text


@on_model
async def test_prompt_longer_than_the_context_is_refused(instance: ModelInstance) -> None:
    long = ChatMessage("user", "hello " * 2100)
    with pytest.raises(ContextLengthExceeded):
        await run(instance, chat(long))
    assert "Paris" in (await run(instance, chat(FRANCE))).choices[0].text


# -------------------------------------------------------------------------------------- unsupported


UNSUPPORTED_CHAT: list[tuple[str, dict[str, Any]]] = [
    ("seed", {"sampling": Sampling(seed=1)}),
    ("logit_bias", {"sampling": Sampling(logit_bias={1: 5.0})}),
    ("frequency_penalty", {"sampling": Sampling(frequency_penalty=0.5)}),
    ("presence_penalty", {"sampling": Sampling(presence_penalty=0.5)}),
    ("logprobs", {"logprobs": True}),
    ("tools", {"tools": (ToolSpec(name="f"),)}),
    ("response_format", {"response_format": ResponseFormat(type="json_object")}),
    ("n", {"n": 2}),
    ("grammar", {"grammar": "root ::= [a-z]+"}),
]

UNSUPPORTED_COMPLETION: list[tuple[str, dict[str, Any]]] = [
    ("best_of", {"best_of": 2}),
    ("echo", {"echo": True}),
    ("suffix", {"suffix": "end"}),
    ("logprobs", {"logprobs": 1}),
    ("n", {"n": 2}),
    ("seed", {"sampling": Sampling(seed=1)}),
]


@pytest.mark.parametrize(("param", "fields"), UNSUPPORTED_CHAT, ids=[p for p, _ in UNSUPPORTED_CHAT])
def test_unsupported_chat_parameters_are_refused(param: str, fields: dict[str, Any]) -> None:
    config = model_config(gpt4all_model())
    with pytest.raises(UnsupportedParameter) as raised:
        check_job(Gpt4AllEngine, config, ChatJob(messages=(FRANCE,), **fields))
    assert raised.value.param == param


@pytest.mark.parametrize(("param", "fields"), UNSUPPORTED_COMPLETION, ids=[p for p, _ in UNSUPPORTED_COMPLETION])
def test_unsupported_completion_parameters_are_refused(param: str, fields: dict[str, Any]) -> None:
    config = model_config(gpt4all_model())
    with pytest.raises(UnsupportedParameter) as raised:
        check_job(Gpt4AllEngine, config, CompletionJob(prompt="Hi", **fields))
    assert raised.value.param == param


def test_supported_parameters_pass() -> None:
    sampling = Sampling(
        max_tokens=5,
        temperature=0.5,
        top_p=0.9,
        top_k=20,
        min_p=0.05,
        repeat_penalty=1.1,
        repeat_last_n=32,
        frequency_penalty=0.0,
        presence_penalty=0.0,
        stop=("x",),
    )
    job = ChatJob(messages=(FRANCE,), sampling=sampling, response_format=ResponseFormat(type="text"))
    check_job(Gpt4AllEngine, model_config(gpt4all_model()), job)


# ------------------------------------------------------------------------------------------ templates


@on_model
async def test_chat_format_is_derived_from_the_gguf(instance: ModelInstance) -> None:
    info = read_gguf_info(model_path("smollm2-gpt4all"))
    assert info.chat_template is not None
    assert "<|im_start|>" in info.chat_template
    assert detect_format(info.chat_template) is CHATML
    assert engine_of(instance).format is CHATML


def test_llama3_template_is_recognised() -> None:
    template = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{% endfor %}"
    assert detect_format(template) is LLAMA3
    assert detect_format(None) is None


def test_unknown_template_without_config_is_a_clear_error() -> None:
    mistral = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    with pytest.raises(ModelUnavailable) as raised:
        format_from_config(None, None, detect_format(mistral))
    assert "prompt_template" in raised.value.message
    assert "system_template" in raised.value.message


def test_configured_templates_win() -> None:
    fmt = format_from_config("[INST] {0} [/INST]{1}</s>", "<<SYS>>{0}<</SYS>>\n", CHATML)
    segments, assistant_open = fmt.render(
        (ChatMessage("system", "S"), ChatMessage("user", "U"), ChatMessage("assistant", "A"), ChatMessage("user", "V")),
        False,
    )
    assert assistant_open
    text = "".join(t for t, _ in segments)
    assert text == "<<SYS>>S<</SYS>>\n[INST] U [/INST]A</s>[INST] V [/INST]"
    # message text is never parsed for special tokens; template text is
    assert ("U", False) in segments
    assert ("[INST] ", True) in segments


def test_chatml_rendering_is_incremental() -> None:
    messages = (ChatMessage("system", "S"), FRANCE, ChatMessage("assistant", "Paris."), ChatMessage("user", "Why?"))
    whole, _ = CHATML.render(messages, False)
    head, state = CHATML.render(messages[:2], False)
    tail, _ = CHATML.render(messages[2:], state)
    assert head + tail == whole
    assert "".join(t for t, _ in whole) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n"
    )


@on_model
async def test_device_and_gpu_layers_reach_gpt4all(instance: ModelInstance) -> None:
    engine = engine_of(instance)
    # device cpu: gpt4all's kompute backend with no GPU device, and no layer offloaded whatever gpu_layers says
    assert engine._gpt.model.ngl == 0
    assert engine._gpt.device is None
    assert engine.placement()["device"] == "cpu"
    assert engine.placement()["backend"] == f"gpt4all ({engine._gpt.backend})"


def test_a_gpu_device_without_a_gpu_is_a_clear_load_error() -> None:
    config = model_config(gpt4all_model(device="gpu", gpu_layers=8))
    assert (config.device.type, config.gpu_layers) == ("gpu", 8)
    with pytest.raises(ModelUnavailable, match="gpt4all cannot use device 'gpu'"):
        Gpt4AllEngine(config, ModelFiles(model_path("smollm2-gpt4all")))
