"""The llama-cpp engine on the real SmolLM2-135M-Instruct GGUF: every request parameter it claims, its KV
cache reuse, its errors and its embedding mode. Driven through ModelInstance (the worker-thread path)."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
import pytest_asyncio

from lllmsd.core.admission import check_job
from lllmsd.core.instance import ModelInstance
from lllmsd.core.jobs import (
    ChatJob,
    ChatMessage,
    CompletionJob,
    EmbeddingJob,
    GenerationEvent,
    GenerationResult,
    ResponseFormat,
    Sampling,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
    collect_generation,
)
from lllmsd.engines.llama_cpp.model import tokenize
from lllmsd.engines.llama_cpp.threads import default_batch_threads, default_threads
from lllmsd.errors import ContextLengthExceeded, InvalidRequest, UnsupportedParameter
from tests.engines.conftest import engine_of, load_instance
from tests.setup_models import model_path

pytestmark = [pytest.mark.engines, pytest.mark.asyncio(loop_scope="module")]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "mood": {"enum": ["happy", "sad"]},
        "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
    },
    "required": ["name", "age", "mood", "hobbies"],
}
WEATHER = ToolSpec(
    "get_weather",
    "The current weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]},
)
TIME = ToolSpec(
    "get_time", "The current time in a time zone", {"type": "object", "properties": {"zone": {"type": "string"}}}
)
STORY = "Write a long story about a dragon who lives in a castle by the sea."
GREEDY = Sampling(temperature=0, max_tokens=12)


def smollm2(**extra: Any) -> dict[str, Any]:
    # One thread each: on busy shared cores ggml's spin-waiting makes two threads many times slower.
    return {
        "task": "text-completion",
        "engine": "llama-cpp",
        "location": str(model_path("smollm2")),
        "device": {"threads": 1, "batch_threads": 1},
        **extra,
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def smol() -> AsyncIterator[ModelInstance]:
    grammars = {"yesno": 'root ::= "yes" | "no"', "person": json.dumps(PERSON)}
    instance = await load_instance(smollm2(grammars=grammars), isolation="thread")
    try:
        yield instance
    finally:
        await instance.dispose()


async def run(instance: ModelInstance, job: ChatJob | CompletionJob) -> tuple[list[GenerationEvent], GenerationResult]:
    check_job(instance.engine_class, instance.config, job)
    events = [event async for event in instance.generate(job)]
    return events, collect_generation(events, job.n)


async def chat(instance: ModelInstance, text: str, sampling: Sampling = GREEDY, **extra: Any) -> GenerationResult:
    _, result = await run(instance, ChatJob((ChatMessage("user", text),), sampling, **extra))
    return result


async def complete(instance: ModelInstance, prompt: str, sampling: Sampling = GREEDY, **extra: Any) -> GenerationResult:
    _, result = await run(instance, CompletionJob(prompt, sampling, **extra))
    return result


def text_of(result: GenerationResult, choice: int = 0) -> str:
    return result.choices[choice].text


# -------------------------------------------------------------------------------------------- sampling


async def test_temperature_zero_is_greedy_whatever_the_seed(smol: ModelInstance) -> None:
    one = await chat(smol, STORY, Sampling(temperature=0, max_tokens=12, seed=1))
    two = await chat(smol, STORY, Sampling(temperature=0, max_tokens=12, seed=2))
    assert text_of(one) == text_of(two)


async def test_high_temperature_samples(smol: ModelInstance) -> None:
    free = Sampling(temperature=1.5, top_k=0, min_p=0, max_tokens=16)
    texts = {text_of(await complete(smol, "My favourite food is", replace(free, seed=seed))) for seed in (1, 2, 3)}
    assert len(texts) > 1


@pytest.mark.parametrize(
    "truncation",
    [{"top_k": 1}, {"top_p": 1e-6, "top_k": 0, "min_p": 0}, {"min_p": 1.0, "top_k": 0}],
    ids=["top_k", "top_p", "min_p"],
)
async def test_truncation_to_one_token_is_greedy(smol: ModelInstance, truncation: dict[str, Any]) -> None:
    greedy = await complete(smol, "My favourite food is", GREEDY)
    hot = await complete(smol, "My favourite food is", Sampling(temperature=1.5, max_tokens=12, seed=9, **truncation))
    assert text_of(hot) == text_of(greedy)


async def test_seed_repeats_and_choices_differ(smol: ModelInstance) -> None:
    sampling = Sampling(temperature=1.2, max_tokens=12, seed=1234)
    one = await chat(smol, "Tell me a joke.", sampling, n=2)
    two = await chat(smol, "Tell me a joke.", sampling, n=2)
    assert [c.text for c in one.choices] == [c.text for c in two.choices]
    assert one.choices[0].text != one.choices[1].text  # each choice has its own stream (seed + index)


async def test_max_tokens_exact_and_completion_default(smol: ModelInstance) -> None:
    result = await complete(smol, "Once upon a time", Sampling(temperature=0, max_tokens=5))
    assert result.usage.completion_tokens == 5
    assert result.choices[0].finish_reason == "length"
    default = await complete(smol, "Once upon a time, in a land far away,", Sampling(temperature=0))
    assert default.usage.completion_tokens <= 16  # OpenAI's completions default
    assert default.usage.completion_tokens == 16 or default.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stop", [(" 6",), (" 5", ","), ("4,",)])
async def test_stop_sequences(smol: ModelInstance, stop: tuple[str, ...]) -> None:
    free = await complete(smol, "1, 2, 3,", Sampling(temperature=0, max_tokens=12))
    assert " 4, 5, 6" in text_of(free)
    cut = await complete(smol, "1, 2, 3,", Sampling(temperature=0, max_tokens=12, stop=stop))
    assert cut.choices[0].finish_reason == "stop"
    assert not any(s in text_of(cut) for s in stop)
    assert text_of(free).startswith(text_of(cut))


@pytest.mark.parametrize("penalty", [{"frequency_penalty": 2.0}, {"repeat_penalty": 1.5}])
async def test_repetition_penalties_cut_repeats(smol: ModelInstance, penalty: dict[str, float]) -> None:
    prompt = "1 1 1 1 1 1 1 1 1 1"
    plain = await complete(smol, prompt, Sampling(temperature=0, max_tokens=12))
    penalised = await complete(smol, prompt, Sampling(temperature=0, max_tokens=12, **penalty))
    assert text_of(plain).count("1") >= 6
    assert text_of(penalised).count("1") < text_of(plain).count("1")


async def test_presence_penalty_changes_the_answer(smol: ModelInstance) -> None:
    plain = await chat(smol, STORY, Sampling(temperature=0, max_tokens=24))
    penalised = await chat(smol, STORY, Sampling(temperature=0, max_tokens=24, presence_penalty=2.0))
    assert text_of(plain) != text_of(penalised)


async def test_logit_bias_bans_a_token(smol: ModelInstance) -> None:
    free = await complete(smol, "1, 2, 3,", Sampling(temperature=0, max_tokens=6), logprobs=0)
    first = free.choices[0].logprobs[0].token
    ids = tokenize(engine_of(smol)._llama, first, add_bos=False)
    assert len(ids) == 1
    banned = await complete(
        smol, "1, 2, 3,", Sampling(temperature=0, max_tokens=6, logit_bias={ids[0]: -100}), logprobs=0
    )
    assert first not in [lp.token for lp in banned.choices[0].logprobs]
    assert len(banned.choices[0].logprobs) == banned.usage.completion_tokens


# -------------------------------------------------------------------------------------------- logprobs


async def test_chat_logprobs_shape(smol: ModelInstance) -> None:
    result = await chat(smol, STORY, Sampling(temperature=0, max_tokens=6), logprobs=True, top_logprobs=3)
    logprobs = result.choices[0].logprobs
    assert len(logprobs) == 6
    assert "".join(lp.token for lp in logprobs) == text_of(result)
    for lp in logprobs:
        assert lp.bytes == tuple(lp.token.encode())
        assert len(lp.top) == 3
        assert lp.top[0].token == lp.token  # greedy picks the likeliest
        assert lp.top[0].logprob == pytest.approx(lp.logprob)
        assert lp.top[0].logprob >= lp.top[1].logprob >= lp.top[2].logprob
        assert sum(math.exp(t.logprob) for t in lp.top) <= 1.0 + 1e-6


async def test_completion_logprobs_have_text_offsets(smol: ModelInstance) -> None:
    result = await complete(smol, "1, 2, 3,", Sampling(temperature=0, max_tokens=6), logprobs=2)
    text = text_of(result)
    logprobs = result.choices[0].logprobs
    assert logprobs[0].text_offset == 0
    for lp in logprobs:
        assert text[lp.text_offset : lp.text_offset + len(lp.token)] == lp.token
        assert len(lp.top) == 2


# ----------------------------------------------------------------------------------- completions extras


async def test_echo_prepends_the_prompt(smol: ModelInstance) -> None:
    plain = await complete(smol, "The sky is", Sampling(temperature=0, max_tokens=5))
    echoed = await complete(smol, "The sky is", Sampling(temperature=0, max_tokens=5), echo=True, n=2)
    assert [c.text for c in echoed.choices] == ["The sky is" + text_of(plain)] * 2


async def test_echo_with_logprobs_is_refused(smol: ModelInstance) -> None:
    with pytest.raises(UnsupportedParameter) as error:
        check_job(smol.engine_class, smol.config, CompletionJob("x", echo=True, logprobs=1))
    assert error.value.param == "logprobs"


async def test_suffix_needs_fill_in_the_middle_tokens(smol: ModelInstance) -> None:
    with pytest.raises(UnsupportedParameter) as error:
        await complete(smol, "def add(a, b):", suffix="\n    return c")  # SmolLM2's GGUF has no FIM tokens
    assert error.value.param == "suffix"


async def test_best_of_keeps_the_likeliest_candidate(smol: ModelInstance) -> None:
    sampling = Sampling(temperature=1.0, max_tokens=6, seed=77)
    every = await complete(smol, "My favourite animal is", sampling, n=3, logprobs=0)
    best = await complete(smol, "My favourite animal is", sampling, n=1, best_of=3)
    scores = [sum(lp.logprob for lp in c.logprobs) / len(c.logprobs) for c in every.choices]
    assert [c.index for c in best.choices] == [0]
    assert text_of(best) == every.choices[scores.index(max(scores))].text
    assert best.usage.completion_tokens == every.usage.completion_tokens  # all candidates are billed


# ---------------------------------------------------------------------------------- structured output


async def test_json_object(smol: ModelInstance) -> None:
    result = await chat(
        smol,
        'Reply with a JSON object like {"name": "Tom"} for a cat.',
        Sampling(temperature=0, max_tokens=60),
        response_format=ResponseFormat(type="json_object"),
    )
    assert result.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(text_of(result)), dict)


def check_person(value: Any) -> None:
    """PERSON validated by hand (jsonschema is not installed)."""
    assert set(value) == {"name", "age", "mood", "hobbies"}
    assert isinstance(value["name"], str)
    assert isinstance(value["age"], int)
    assert value["mood"] in ("happy", "sad")
    assert isinstance(value["hobbies"], list)
    assert len(value["hobbies"]) <= 2
    assert all(isinstance(h, str) for h in value["hobbies"])


async def test_json_schema_output_validates(smol: ModelInstance) -> None:
    result = await chat(
        smol,
        "Describe a person.",
        Sampling(temperature=0.7, seed=5, max_tokens=120),
        response_format=ResponseFormat(type="json_schema", schema=PERSON, name="person"),
    )
    assert result.choices[0].finish_reason == "stop"
    check_person(json.loads(text_of(result)))


async def test_inline_grammar(smol: ModelInstance) -> None:
    grammar = 'root ::= [0-9] [0-9] "-" [a-z]+'
    result = await chat(smol, "Give me a code.", Sampling(temperature=1.0, seed=3, max_tokens=12), grammar=grammar)
    text = text_of(result)
    assert text[:2].isdigit()
    assert text[2] == "-"
    assert text[3:].isalpha()


async def test_named_grammars_from_the_config(smol: ModelInstance) -> None:
    yes_no = await chat(smol, "Is water wet?", grammar="yesno")
    assert text_of(yes_no) in ("yes", "no")
    person = await chat(smol, "Describe a person.", Sampling(temperature=0, max_tokens=120), grammar="person")
    check_person(json.loads(text_of(person)))


async def test_invalid_grammar_is_a_request_error(smol: ModelInstance) -> None:
    with pytest.raises(InvalidRequest):
        await chat(smol, "Hi", grammar="root ::= (")
    assert text_of(await chat(smol, "Hi", Sampling(max_tokens=3)))  # the instance still serves


async def test_grammar_and_json_format_together_are_refused(smol: ModelInstance) -> None:
    job = ChatJob((ChatMessage("user", "x"),), grammar="yesno", response_format=ResponseFormat(type="json_object"))
    with pytest.raises(UnsupportedParameter):
        check_job(smol.engine_class, smol.config, job)


# ------------------------------------------------------------------------------------------------ tools


def compact(arguments: str) -> str:
    return json.dumps(json.loads(arguments), separators=(",", ":"), ensure_ascii=False)


async def tool_chat(smol: ModelInstance, text: str, **extra: Any) -> tuple[list[GenerationEvent], GenerationResult]:
    job = ChatJob((ChatMessage("user", text),), Sampling(temperature=0, max_tokens=100), tools=(WEATHER, TIME), **extra)
    return await run(smol, job)


async def test_tool_choice_required(smol: ModelInstance) -> None:
    # a streamed job: its calls go out in fragments as they are generated (a collected one gets them whole)
    events, result = await tool_chat(smol, "What is the weather in Paris?", tool_choice="required", stream=True)
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.text == ""
    for call in choice.tool_calls:
        assert call.name in ("get_weather", "get_time")
        assert call.arguments == compact(call.arguments)
        assert call.id.startswith("call_")
    fragments = [e for e in events if isinstance(e, ToolCallDelta) and e.call_index == 0]
    assert fragments[0].id == choice.tool_calls[0].id
    assert fragments[0].name == choice.tool_calls[0].name
    assert len(fragments) > 2  # arguments arrive in pieces
    assert all(f.name is None and f.id is None for f in fragments[1:])


async def test_tool_choice_names_a_function(smol: ModelInstance) -> None:
    _, result = await tool_chat(smol, "What time is it in Tokyo?", tool_choice="get_weather", parallel_tool_calls=False)
    (call,) = result.choices[0].tool_calls
    assert call.name == "get_weather"
    arguments = json.loads(call.arguments)
    assert isinstance(arguments["city"], str)
    assert isinstance(arguments.get("days", 0), int)


async def test_tool_choice_none_answers_in_text(smol: ModelInstance) -> None:
    _, result = await tool_chat(smol, "What is the weather in Paris?", tool_choice="none")
    assert not result.choices[0].tool_calls
    assert result.choices[0].finish_reason in ("stop", "length")
    assert result.choices[0].text


async def test_tool_choice_auto_gives_text_or_a_valid_call(smol: ModelInstance) -> None:
    for text in ("What is the weather in Paris? Call get_weather.", "Say hello."):
        _, result = await tool_chat(smol, text, tool_choice="auto")
        choice = result.choices[0]
        if choice.tool_calls:
            assert choice.finish_reason == "tool_calls"
            assert all(isinstance(json.loads(c.arguments), dict) for c in choice.tool_calls)
        else:
            assert choice.text
            assert "<tool_call>" not in choice.text


async def test_tool_results_can_be_sent_back(smol: ModelInstance) -> None:
    call = ToolCall("call_1", "get_weather", '{"city":"Paris"}')
    messages = (
        ChatMessage("user", "What is the weather in Paris?"),
        ChatMessage("assistant", None, tool_calls=(call,)),
        ChatMessage("tool", "Sunny, 24 C", tool_call_id="call_1"),
    )
    _, result = await run(smol, ChatJob(messages, Sampling(temperature=0, max_tokens=12), tools=(WEATHER,)))
    assert result.choices[0].text or result.choices[0].tool_calls


# ----------------------------------------------------------------------------------------- KV cache


async def test_follow_up_turns_reuse_the_cache(smol: ModelInstance) -> None:
    """The issue's must-show: turn 2 of a 3-turn chat evaluates only its new tokens."""
    sampling = Sampling(temperature=0, max_tokens=8)
    messages: tuple[ChatMessage, ...] = (ChatMessage("user", "Name a colour."),)
    _, one = await run(smol, ChatJob(messages, sampling))
    messages += (ChatMessage("assistant", text_of(one)), ChatMessage("user", "Name an animal."))
    _, two = await run(smol, ChatJob(messages, sampling))
    assert two.usage.cached_tokens >= one.usage.prompt_tokens + one.usage.completion_tokens - 3
    messages += (ChatMessage("assistant", text_of(two)), ChatMessage("user", "Name a fruit."))
    _, three = await run(smol, ChatJob(messages, sampling))
    assert three.usage.cached_tokens >= two.usage.prompt_tokens + two.usage.completion_tokens - 3

    await complete(smol, "Unrelated text fills the cache.", Sampling(max_tokens=2))
    _, cold = await run(smol, ChatJob(messages[:3], sampling))
    assert cold.usage.cached_tokens == 0
    assert cold.usage.prompt_tokens == two.usage.prompt_tokens
    assert two.usage.prompt_tokens - two.usage.cached_tokens < cold.usage.prompt_tokens // 2


@pytest.mark.parametrize("slots", [1, 2])
async def test_preload_fills_the_cache(slots: int) -> None:
    """With slots, the preload fills one slot's sequence, and the first request finds it there."""
    system = "You are a pirate. Answer every question like a pirate would, with many pirate words."
    instance = await load_instance(
        smollm2(preload={"messages": [{"role": "system", "content": system}]}, slots=slots), isolation="thread"
    )
    try:
        preloaded = instance.cached_tokens
        assert preloaded > 10
        messages = (ChatMessage("system", system), ChatMessage("user", "Hello!"))
        _, result = await run(instance, ChatJob(messages, Sampling(max_tokens=4)))
        assert result.usage.cached_tokens >= preloaded - 1
    finally:
        await instance.dispose()


# ----------------------------------------------------------------------------------------- threads


async def test_default_threads_divide_the_cores_between_instances() -> None:
    # One instance: half the cores to generate, all to evaluate prompts (llama-cpp-python's choice).
    assert (default_threads(1, cores=2), default_batch_threads(1, cores=2)) == (1, 2)
    assert (default_threads(1, cores=8), default_batch_threads(1, cores=8)) == (4, 8)
    # Instances sharing the cores: each its share, at least one thread.
    assert (default_threads(2, cores=2), default_batch_threads(2, cores=2)) == (1, 1)
    assert (default_threads(2, cores=8), default_batch_threads(2, cores=8)) == (4, 4)
    assert (default_threads(3, cores=8), default_batch_threads(3, cores=8)) == (2, 2)
    assert (default_threads(4, cores=2), default_batch_threads(4, cores=2)) == (1, 1)
    # An instance with slots decodes a token of each request per step: compute-bound, its whole share.
    assert default_threads(1, cores=2, slots=4) == 2
    assert default_threads(2, cores=8, slots=4) == 4


async def test_threads_come_from_the_device_or_the_instance_count() -> None:
    shared = {k: v for k, v in smollm2(max_instances=2).items() if k != "device"}
    instance = await load_instance(shared, isolation="thread")
    try:
        llama = engine_of(instance)._llama
        assert (llama.n_threads, llama.n_threads_batch) == (default_threads(2), default_batch_threads(2))
    finally:
        await instance.dispose()
    instance = await load_instance(
        smollm2(max_instances=2, device={"threads": 3, "batch_threads": 2}), isolation="thread"
    )
    try:
        llama = engine_of(instance)._llama
        assert (llama.n_threads, llama.n_threads_batch) == (3, 2)
    finally:
        await instance.dispose()


# ---------------------------------------------------------------------------------- context and format


async def test_small_context_limits() -> None:
    instance = await load_instance(smollm2(context_size=256), isolation="thread")
    size = engine_of(instance).context_size  # llama.cpp pads the context to a multiple of 256
    assert size == 256
    try:
        # a prompt a few tokens short of the context: the answer runs into the context's end
        _, result = await run(instance, CompletionJob("hello " * 250, Sampling(temperature=0, max_tokens=100)))
        assert result.choices[0].finish_reason == "length"
        assert result.usage.total_tokens == size
        with pytest.raises(ContextLengthExceeded) as error:
            await run(instance, ChatJob((ChatMessage("user", STORY * 20),)))
        assert error.value.context_size == size
        assert str(size) in error.value.message
        assert str(error.value.prompt_tokens) in error.value.message
    finally:
        await instance.dispose()


async def test_chat_format_override(smol: ModelInstance) -> None:
    own = await chat(smol, "Hi", Sampling(max_tokens=2))
    instance = await load_instance(smollm2(chat_format="chatml"), isolation="thread")
    try:
        _, result = await run(instance, ChatJob((ChatMessage("user", "Hi"),), Sampling(max_tokens=2)))
    finally:
        await instance.dispose()
    # the GGUF's template adds a default system prompt; llama-cpp-python's plain chatml does not
    assert 0 < result.usage.prompt_tokens < own.usage.prompt_tokens


async def test_usage_prompt_tokens_match_the_rendered_prompt(smol: ModelInstance) -> None:
    messages = (ChatMessage("user", "Count the tokens of this message."),)
    result = await chat(smol, messages[0].content or "", Sampling(max_tokens=2))
    tokens = engine_of(smol)._prompt.render(messages, (), open_turn=True).tokens
    assert result.usage.prompt_tokens == len(tokens)


# ------------------------------------------------------------------------------------------- embedding


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def embedder() -> AsyncIterator[ModelInstance]:
    instance = await load_instance(smollm2(task="embedding"), isolation="thread")
    try:
        yield instance
    finally:
        await instance.dispose()


async def test_embeddings(embedder: ModelInstance) -> None:
    texts = ("The cat sat on the mat.", "A cat was sitting on the mat.", "Quantum chromodynamics describes quarks.")
    ids = tuple(tokenize(engine_of(embedder)._llama, texts[0]))
    result = await embedder.embed(EmbeddingJob((*texts, ids)))
    assert len(result.vectors) == 4
    assert all(len(v) == 576 for v in result.vectors)
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-6) for v in result.vectors)
    assert result.token_counts[0] == len(ids)
    assert result.token_counts[3] == len(ids)
    assert result.vectors[3] == pytest.approx(result.vectors[0], abs=1e-4)  # ids embed like their text

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cosine(result.vectors[0], result.vectors[1]) > cosine(result.vectors[0], result.vectors[2])
    alone = await embedder.embed(EmbeddingJob((texts[1],)))
    assert cosine(alone.vectors[0], result.vectors[1]) > 0.9999  # batching changes a vector only by rounding


async def test_embeddings_are_full_length_and_bad_inputs_are_refused(embedder: ModelInstance) -> None:
    # the pool applies dimensions (tests/engines/test_embedding_contract.py): the engine returns full vectors
    result = await embedder.embed(EmbeddingJob(("hello world",), dimensions=64))
    assert len(result.vectors[0]) == 576
    with pytest.raises(InvalidRequest):
        await embedder.embed(EmbeddingJob(((10**9,),)))
    with pytest.raises(InvalidRequest):
        await embedder.embed(EmbeddingJob(("",)))
