"""The contract every text engine keeps, run on each engine in ``TEXT_MODELS`` through ModelInstance.

Joining: add the engine's model to ``TEXT_MODELS`` (conftest.py) and, if it does more than the base
contract, its entry to ``CAPABILITIES`` below. Every engine must keep the base contract (answers, stream
order, max_tokens, stop, usage, cancellation, context overflow, cached tokens on a follow-up turn). An
optional feature is tested where the engine claims it (``supports``) and must be refused by
``check_task`` with UnsupportedParameter where the engine says it cannot do it (``refuses``); a feature in
neither set is not tested for that engine.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
import pytest_asyncio

from lllmsd.core.instance import ModelInstance
from lllmsd.core.tasks import (
    ChatMessage,
    ChatTask,
    ChoiceEnd,
    CompletionTask,
    GenerationEvent,
    GenerationResult,
    ResponseFormat,
    Sampling,
    TextDelta,
    ToolCallDelta,
    ToolSpec,
    Usage,
    collect_generation,
)
from lllmsd.errors import ContextLengthExceeded, UnsupportedParameter
from tests.engines.conftest import TEXT_MODELS, load_instance

pytestmark = [pytest.mark.engines, pytest.mark.asyncio(loop_scope="module")]

STORY = "Write a long story about a dragon who lives in a castle by the sea with her three friends."


@dataclass(frozen=True)
class Capabilities:
    supports: frozenset[str] = frozenset()
    refuses: frozenset[str] = frozenset()


CAPABILITIES: dict[str, Capabilities] = {
    "fake": Capabilities(
        supports=frozenset({"n", "seed", "logprobs", "tools", "echo"}),
        refuses=frozenset({"grammar", "json_schema", "echo_logprobs"}),
    ),
    "llama-cpp": Capabilities(
        supports=frozenset({"n", "seed", "logprobs", "grammar", "json_schema", "tools", "echo"}),
        refuses=frozenset({"echo_logprobs"}),
    ),
    "gpt4all": Capabilities(
        refuses=frozenset({"n", "seed", "logprobs", "grammar", "json_schema", "tools", "echo", "echo_logprobs"})
    ),
}

WEATHER = ToolSpec(
    name="get_weather",
    description="The current weather in a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}

# Feature -> a task that uses it. The same task is what a refusing engine's check_task must reject.
FEATURE_TASKS: dict[str, Callable[[], ChatTask | CompletionTask]] = {
    "n": lambda: ChatTask(user("Say something nice."), Sampling(max_tokens=6, temperature=0.8), n=2),
    "seed": lambda: ChatTask(user("Tell me a joke."), Sampling(max_tokens=12, temperature=0.9, seed=42)),
    "logprobs": lambda: ChatTask(user(STORY), Sampling(max_tokens=5), logprobs=True, top_logprobs=2),
    "grammar": lambda: ChatTask(user("Is the sky blue?"), Sampling(max_tokens=5), grammar='root ::= "yes" | "no"'),
    "json_schema": lambda: ChatTask(
        user("Describe a person as JSON."),
        Sampling(max_tokens=40, temperature=0),
        response_format=ResponseFormat(type="json_schema", schema=PERSON_SCHEMA, name="person"),
    ),
    "tools": lambda: ChatTask(
        user("What is the weather in Paris? get_weather"),
        Sampling(max_tokens=80, temperature=0),
        tools=(WEATHER,),
        tool_choice="required",
    ),
    "echo": lambda: CompletionTask("Once upon a time", Sampling(max_tokens=4), echo=True),
    "echo_logprobs": lambda: CompletionTask("Once upon a time", Sampling(max_tokens=4), echo=True, logprobs=1),
}


def supporting(feature: str) -> pytest.MarkDecorator:
    """Run a feature test on the engines that claim the feature (the others must refuse it: see below)."""
    engines = sorted(engine for engine in TEXT_MODELS if feature in CAPABILITIES[engine].supports)
    return pytest.mark.parametrize("subject", engines, indirect=True)


def user(text: str) -> tuple[ChatMessage, ...]:
    return (ChatMessage(role="user", content=text),)


@dataclass
class Subject:
    engine: str
    instance: ModelInstance
    caps: Capabilities

    def check(self, task: ChatTask | CompletionTask) -> None:
        self.instance.engine_class.check_task(self.instance.config, task)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=sorted(TEXT_MODELS))
async def subject(request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    instance = await load_instance(TEXT_MODELS[request.param]())
    try:
        yield Subject(request.param, instance, CAPABILITIES.get(request.param, Capabilities()))
    finally:
        await instance.dispose()


async def run(subject: Subject, task: ChatTask | CompletionTask) -> tuple[list[GenerationEvent], GenerationResult]:
    subject.check(task)
    events = [event async for event in subject.instance.generate(task)]
    return events, collect_generation(events, task.n)


# ------------------------------------------------------------------------------------ base contract


async def test_chat_answers(subject: Subject) -> None:
    _, result = await run(subject, ChatTask(user("Hello, who are you?"), Sampling(max_tokens=12)))
    assert result.choices[0].text.strip()
    assert result.choices[0].finish_reason in ("stop", "length")


async def test_completion_answers(subject: Subject) -> None:
    _, result = await run(subject, CompletionTask("The capital of France is", Sampling(max_tokens=6)))
    assert result.choices[0].text
    assert result.choices[0].finish_reason in ("stop", "length")


async def test_stream_order(subject: Subject) -> None:
    events, _ = await run(subject, ChatTask(user(STORY), Sampling(max_tokens=6)))
    assert isinstance(events[-1], Usage)
    assert sum(isinstance(e, Usage) for e in events) == 1
    ends = [i for i, e in enumerate(events) if isinstance(e, ChoiceEnd)]
    assert len(ends) == 1
    assert all(isinstance(e, TextDelta | ToolCallDelta) for e in events[: ends[0]])
    assert ends[0] == len(events) - 2


async def test_max_tokens_is_exact(subject: Subject) -> None:
    _, result = await run(subject, ChatTask(user(STORY), Sampling(max_tokens=7, temperature=0)))
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 7


@pytest.mark.parametrize("several", [False, True])
async def test_stop_sequence_is_never_in_the_output(subject: Subject, several: bool) -> None:
    sampling = Sampling(max_tokens=16, temperature=0)
    _, free = await run(subject, ChatTask(user(STORY), sampling))
    words = free.choices[0].text.split()
    assert len(words) >= 3, free.choices[0].text
    stop = words[len(words) // 2]
    stops = (stop, "never-appears-xyz") if several else (stop,)
    _, cut = await run(subject, ChatTask(user(STORY), Sampling(max_tokens=16, temperature=0, stop=stops)))
    text = cut.choices[0].text
    assert stop not in text
    assert cut.choices[0].finish_reason == "stop"
    assert free.choices[0].text.startswith(text)


async def test_usage_counts_are_real(subject: Subject) -> None:
    _, short = await run(subject, ChatTask(user("Hi"), Sampling(max_tokens=3)))
    _, long = await run(subject, ChatTask(user(STORY), Sampling(max_tokens=3)))
    assert 0 < short.usage.prompt_tokens < long.usage.prompt_tokens
    assert long.usage.prompt_tokens - short.usage.prompt_tokens >= len(STORY.split()) - 2
    assert 0 < long.usage.completion_tokens <= 3
    assert long.usage.total_tokens == long.usage.prompt_tokens + long.usage.completion_tokens


async def test_follow_up_turn_hits_the_cache(subject: Subject) -> None:
    first = user("Name three colours.")
    _, one = await run(subject, ChatTask(first, Sampling(max_tokens=8, temperature=0)))
    follow = (*first, ChatMessage("assistant", one.choices[0].text), ChatMessage("user", "And three animals?"))
    _, two = await run(subject, ChatTask(follow, Sampling(max_tokens=4)))
    assert two.usage.cached_tokens > 0
    assert two.usage.cached_tokens >= one.usage.prompt_tokens - 1


async def test_context_overflow_is_an_error(subject: Subject) -> None:
    huge = "hello " * 20000
    with pytest.raises(ContextLengthExceeded) as chat_error:
        await run(subject, ChatTask(user(huge), Sampling(max_tokens=4)))
    assert chat_error.value.prompt_tokens > chat_error.value.context_size
    assert str(chat_error.value.context_size) in chat_error.value.message
    with pytest.raises(ContextLengthExceeded):
        await run(subject, CompletionTask(huge, Sampling(max_tokens=4)))
    _, after = await run(subject, ChatTask(user("Hello"), Sampling(max_tokens=2)))  # still serving
    assert after.usage.completion_tokens > 0


async def test_a_requested_max_tokens_must_fit_beside_the_prompt(subject: Subject) -> None:
    too_many = Sampling(max_tokens=1_000_000, strict_max_tokens=True)  # more than any test model's context
    for task in (ChatTask(user("Hello there"), too_many), CompletionTask("Once upon a time", too_many)):
        with pytest.raises(ContextLengthExceeded) as error:
            await run(subject, task)
        assert error.value.param == "max_tokens"
        assert error.value.prompt_tokens > error.value.context_size
        assert str(error.value.context_size) in error.value.message
    _, after = await run(subject, ChatTask(user("Hello"), Sampling(max_tokens=2)))  # still serving
    assert after.usage.completion_tokens > 0


async def test_consumer_leaving_stops_the_stream(subject: Subject) -> None:
    task = ChatTask(user(STORY), Sampling(max_tokens=200))
    subject.check(task)
    seen = []
    async with contextlib.aclosing(subject.instance.generate(task)) as events:
        async for event in events:
            seen.append(event)
            break
    # aclose() returned: the worker thread has finished the call, so the instance can serve again
    assert len(seen) == 1
    _, result = await run(subject, ChatTask(user("Hello"), Sampling(max_tokens=2)))
    assert result.usage.completion_tokens > 0


async def test_engine_stops_within_one_token_of_cancel(subject: Subject) -> None:
    """On the worker thread, the engine's own iterator ends at most one event after cancel is set."""
    task = ChatTask(user(STORY), Sampling(max_tokens=100))
    engine = subject.instance._engine

    def drive() -> list[GenerationEvent]:
        cancel = threading.Event()
        after_cancel: list[GenerationEvent] = []
        for event in engine.chat(task, cancel):
            if cancel.is_set():
                after_cancel.append(event)
            cancel.set()
        return after_cancel

    after = await subject.instance._in_worker(drive)
    assert len(after) <= 1
    assert not any(isinstance(e, Usage | ChoiceEnd) for e in after)


# ---------------------------------------------------------------------------------- optional features


@supporting("n")
async def test_n_choices(subject: Subject) -> None:
    _, result = await run(subject, FEATURE_TASKS["n"]())
    assert [c.index for c in result.choices] == [0, 1]
    assert all(c.finish_reason for c in result.choices)
    assert all(c.text for c in result.choices)
    assert result.usage.completion_tokens >= 2


@supporting("seed")
async def test_seed_repeats(subject: Subject) -> None:
    _, one = await run(subject, FEATURE_TASKS["seed"]())
    _, two = await run(subject, FEATURE_TASKS["seed"]())
    assert one.choices[0].text == two.choices[0].text


@supporting("logprobs")
async def test_logprobs(subject: Subject) -> None:
    _, result = await run(subject, FEATURE_TASKS["logprobs"]())
    logprobs = result.choices[0].logprobs
    assert len(logprobs) == result.usage.completion_tokens
    for lp in logprobs:
        assert lp.logprob <= 0
        assert len(lp.top) == 2
        assert lp.top[0].logprob >= lp.top[1].logprob


@supporting("grammar")
async def test_grammar_constrains(subject: Subject) -> None:
    _, result = await run(subject, FEATURE_TASKS["grammar"]())
    assert result.choices[0].text in ("yes", "no")


@supporting("json_schema")
async def test_json_schema_output_validates(subject: Subject) -> None:
    _, result = await run(subject, FEATURE_TASKS["json_schema"]())
    value = json.loads(result.choices[0].text)
    assert isinstance(value["name"], str)
    assert isinstance(value["age"], int)


@supporting("tools")
async def test_tool_call(subject: Subject) -> None:
    events, result = await run(subject, FEATURE_TASKS["tools"]())
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.tool_calls[0].name == "get_weather"
    assert isinstance(json.loads(choice.tool_calls[0].arguments), dict)
    fragments = [e for e in events if isinstance(e, ToolCallDelta) and e.call_index == 0]
    assert fragments[0].id
    assert fragments[0].name == "get_weather"
    assert all(f.id is None and f.name is None for f in fragments[1:])


@supporting("echo")
async def test_echo(subject: Subject) -> None:
    _, result = await run(subject, FEATURE_TASKS["echo"]())
    assert result.choices[0].text.startswith("Once upon a time")
    assert len(result.choices[0].text) > len("Once upon a time")


@pytest.mark.parametrize(
    ("subject", "feature"),
    [(engine, feature) for engine in sorted(TEXT_MODELS) for feature in sorted(CAPABILITIES[engine].refuses)],
    indirect=["subject"],
)
async def test_refused_features_fail_in_check_task(subject: Subject, feature: str) -> None:
    with pytest.raises(UnsupportedParameter) as error:
        subject.check(FEATURE_TASKS[feature]())
    assert error.value.param


async def test_capabilities_are_consistent() -> None:
    for engine, caps in CAPABILITIES.items():
        assert not caps.supports & caps.refuses, engine
        # every optional feature is either honoured or refused: an engine never silently ignores one
        assert caps.supports | caps.refuses == set(FEATURE_TASKS), engine
