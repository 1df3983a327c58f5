"""The contract every text engine keeps, run on each engine in ``TEXT_MODELS`` through ModelInstance.

Joining: add the engine's model to ``TEXT_MODELS`` (conftest.py). Every engine must keep the base
contract (answers, stream order, max_tokens, stop, usage, cancellation, context overflow, cached tokens on
a follow-up turn). The optional features are read from the engine class's own declaration (its
``features``, the same one admission and ``GET /`` read): each declared feature is tested, and every
other text feature must be refused by admission's check (``check_job``) with UnsupportedParameter. No
feature is left untested either way.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
import pytest_asyncio

from lllmsd.core.admission import check_job
from lllmsd.core.instance import ModelInstance
from lllmsd.core.jobs import (
    ChatJob,
    ChatMessage,
    ChoiceEnd,
    CompletionJob,
    Feature,
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
from lllmsd.engines.base import Engine
from lllmsd.engines.registry import builtin_engines
from lllmsd.errors import ContextLengthExceeded, UnsupportedParameter
from tests.engines.conftest import TEXT_MODELS, engine_of, load_instance, model_config

pytestmark = [pytest.mark.engines, pytest.mark.asyncio(loop_scope="module")]

STORY = "Write a long story about a dragon who lives in a castle by the sea with her three friends."


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

# Every optional feature of chat and completion jobs -> a job that uses it. The same job is what admission
# refuses for an engine that does not declare the feature.
FEATURE_JOBS: dict[Feature, Callable[[], ChatJob | CompletionJob]] = {
    Feature.N: lambda: ChatJob(user("Say something nice."), Sampling(max_tokens=6, temperature=0.8), n=2),
    Feature.SEED: lambda: ChatJob(user("Tell me a joke."), Sampling(max_tokens=12, temperature=0.9, seed=42)),
    Feature.LOGPROBS: lambda: ChatJob(user(STORY), Sampling(max_tokens=5), logprobs=True, top_logprobs=2),
    Feature.GRAMMAR: lambda: ChatJob(user("Is the sky blue?"), Sampling(max_tokens=5), grammar='root ::= "yes" | "no"'),
    Feature.JSON_OUTPUT: lambda: ChatJob(
        user("Describe a person as JSON."),
        Sampling(max_tokens=40, temperature=0),
        response_format=ResponseFormat(type="json_schema", schema=PERSON_SCHEMA, name="person"),
    ),
    Feature.TOOLS: lambda: ChatJob(
        user("What is the weather in Paris? get_weather"),
        Sampling(max_tokens=80, temperature=0),
        tools=(WEATHER,),
        tool_choice="required",
    ),
    Feature.ECHO: lambda: CompletionJob("Once upon a time", Sampling(max_tokens=4), echo=True),
    Feature.ECHO_LOGPROBS: lambda: CompletionJob("Once upon a time", Sampling(max_tokens=4), echo=True, logprobs=1),
    Feature.BEST_OF: lambda: CompletionJob("My favourite animal is", Sampling(max_tokens=4), best_of=2),
    Feature.LOGIT_BIAS: lambda: CompletionJob("1, 2, 3,", Sampling(max_tokens=4, logit_bias={1: -100.0})),
    Feature.PENALTIES: lambda: ChatJob(
        user(STORY), Sampling(max_tokens=8, frequency_penalty=1.0, presence_penalty=0.5)
    ),
    Feature.SUFFIX: lambda: CompletionJob("def add(a, b):", Sampling(max_tokens=8), suffix="\n    return c"),
    Feature.TEMPLATE_KWARGS: lambda: ChatJob(
        user("Say hello."), Sampling(max_tokens=4), template_kwargs={"enable_thinking": False}, reasoning_effort="low"
    ),
}
# features whose own tests below check what they do; the others are checked by test_declared_feature_is_served
TESTED_IN_DEPTH = {
    Feature.N,
    Feature.SEED,
    Feature.LOGPROBS,
    Feature.GRAMMAR,
    Feature.JSON_OUTPUT,
    Feature.TOOLS,
    Feature.ECHO,
}


def declared(engine: str) -> frozenset[Feature]:
    return engine_class(engine).features


def engine_class(subject: str) -> type[Engine]:
    config = model_config(TEXT_MODELS[subject]())
    return builtin_engines()[config.engine].class_for(config.task)


def supporting(feature: Feature) -> pytest.MarkDecorator:
    """Run a feature test on the engines that declare the feature (the others must refuse it: see below)."""
    engines = sorted(engine for engine in TEXT_MODELS if feature in declared(engine))
    return pytest.mark.parametrize("subject", engines, indirect=True)


def user(text: str) -> tuple[ChatMessage, ...]:
    return (ChatMessage(role="user", content=text),)


@dataclass
class Subject:
    engine: str
    instance: ModelInstance

    def check(self, job: ChatJob | CompletionJob) -> None:
        """What admission checks before a job queues."""
        check_job(self.instance.engine_class, self.instance.config, job)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=sorted(TEXT_MODELS))
async def subject(request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    instance = await load_instance(TEXT_MODELS[request.param]())
    try:
        yield Subject(request.param, instance)
    finally:
        await instance.dispose()


async def run(subject: Subject, job: ChatJob | CompletionJob) -> tuple[list[GenerationEvent], GenerationResult]:
    subject.check(job)
    events = [event async for event in subject.instance.generate(job)]
    return events, collect_generation(events, job.n)


# ------------------------------------------------------------------------------------ base contract


async def test_chat_answers(subject: Subject) -> None:
    _, result = await run(subject, ChatJob(user("Hello, who are you?"), Sampling(max_tokens=12)))
    assert result.choices[0].text.strip()
    assert result.choices[0].finish_reason in ("stop", "length")


async def test_completion_answers(subject: Subject) -> None:
    _, result = await run(subject, CompletionJob("The capital of France is", Sampling(max_tokens=6)))
    assert result.choices[0].text
    assert result.choices[0].finish_reason in ("stop", "length")


async def test_stream_order(subject: Subject) -> None:
    events, _ = await run(subject, ChatJob(user(STORY), Sampling(max_tokens=6)))
    assert isinstance(events[-1], Usage)
    assert sum(isinstance(e, Usage) for e in events) == 1
    ends = [i for i, e in enumerate(events) if isinstance(e, ChoiceEnd)]
    assert len(ends) == 1
    assert all(isinstance(e, TextDelta | ToolCallDelta) for e in events[: ends[0]])
    assert ends[0] == len(events) - 2


async def test_max_tokens_is_exact(subject: Subject) -> None:
    _, result = await run(subject, ChatJob(user(STORY), Sampling(max_tokens=7, temperature=0)))
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 7


@pytest.mark.parametrize("several", [False, True])
async def test_stop_sequence_is_never_in_the_output(subject: Subject, several: bool) -> None:
    sampling = Sampling(max_tokens=16, temperature=0)
    _, free = await run(subject, ChatJob(user(STORY), sampling))
    words = free.choices[0].text.split()
    assert len(words) >= 3, free.choices[0].text
    stop = words[len(words) // 2]
    stops = (stop, "never-appears-xyz") if several else (stop,)
    _, cut = await run(subject, ChatJob(user(STORY), Sampling(max_tokens=16, temperature=0, stop=stops)))
    text = cut.choices[0].text
    assert stop not in text
    assert cut.choices[0].finish_reason == "stop"
    assert free.choices[0].text.startswith(text)


async def test_usage_counts_are_real(subject: Subject) -> None:
    _, short = await run(subject, ChatJob(user("Hi"), Sampling(max_tokens=3)))
    _, long = await run(subject, ChatJob(user(STORY), Sampling(max_tokens=3)))
    assert 0 < short.usage.prompt_tokens < long.usage.prompt_tokens
    assert long.usage.prompt_tokens - short.usage.prompt_tokens >= len(STORY.split()) - 2
    assert 0 < long.usage.completion_tokens <= 3
    assert long.usage.total_tokens == long.usage.prompt_tokens + long.usage.completion_tokens


async def test_follow_up_turn_hits_the_cache(subject: Subject) -> None:
    first = user("Name three colours.")
    _, one = await run(subject, ChatJob(first, Sampling(max_tokens=8, temperature=0)))
    follow = (*first, ChatMessage("assistant", one.choices[0].text), ChatMessage("user", "And three animals?"))
    _, two = await run(subject, ChatJob(follow, Sampling(max_tokens=4)))
    assert two.usage.cached_tokens > 0
    assert two.usage.cached_tokens >= one.usage.prompt_tokens - 1


async def test_context_overflow_is_an_error(subject: Subject) -> None:
    huge = "hello " * 20000
    with pytest.raises(ContextLengthExceeded) as chat_error:
        await run(subject, ChatJob(user(huge), Sampling(max_tokens=4)))
    assert chat_error.value.prompt_tokens > chat_error.value.context_size
    assert str(chat_error.value.context_size) in chat_error.value.message
    with pytest.raises(ContextLengthExceeded):
        await run(subject, CompletionJob(huge, Sampling(max_tokens=4)))
    _, after = await run(subject, ChatJob(user("Hello"), Sampling(max_tokens=2)))  # still serving
    assert after.usage.completion_tokens > 0


async def test_a_requested_max_tokens_must_fit_beside_the_prompt(subject: Subject) -> None:
    too_many = Sampling(max_tokens=1_000_000, strict_max_tokens=True)  # more than any test model's context
    for job in (ChatJob(user("Hello there"), too_many), CompletionJob("Once upon a time", too_many)):
        with pytest.raises(ContextLengthExceeded) as error:
            await run(subject, job)
        assert error.value.param == "max_tokens"
        assert error.value.prompt_tokens > error.value.context_size
        assert str(error.value.context_size) in error.value.message
    _, after = await run(subject, ChatJob(user("Hello"), Sampling(max_tokens=2)))  # still serving
    assert after.usage.completion_tokens > 0


async def test_consumer_leaving_stops_the_stream(subject: Subject) -> None:
    job = ChatJob(user(STORY), Sampling(max_tokens=200))
    subject.check(job)
    seen = []
    async with contextlib.aclosing(subject.instance.generate(job)) as events:
        async for event in events:
            seen.append(event)
            break
    # aclose() returned: the worker thread has finished the call, so the instance can serve again
    assert len(seen) == 1
    _, result = await run(subject, ChatJob(user("Hello"), Sampling(max_tokens=2)))
    assert result.usage.completion_tokens > 0


async def test_engine_stops_within_one_token_of_cancel(subject: Subject) -> None:
    """On the engine's own thread, its iterator ends at most one event after cancel is set."""
    job = ChatJob(user(STORY), Sampling(max_tokens=100))
    instance = await load_instance(TEXT_MODELS[subject.engine](), isolation="thread")
    engine = engine_of(instance)

    def drive() -> list[GenerationEvent]:
        cancel = threading.Event()
        after_cancel: list[GenerationEvent] = []
        for event in engine.chat(job, cancel):
            if cancel.is_set():
                after_cancel.append(event)
            cancel.set()
        return after_cancel

    try:
        after = await instance.host.run(drive)
    finally:
        await instance.dispose()
    assert len(after) <= 1
    assert not any(isinstance(e, Usage | ChoiceEnd) for e in after)


# ---------------------------------------------------------------------------------- optional features


@supporting(Feature.N)
async def test_n_choices(subject: Subject) -> None:
    _, result = await run(subject, FEATURE_JOBS[Feature.N]())
    assert [c.index for c in result.choices] == [0, 1]
    assert all(c.finish_reason for c in result.choices)
    assert all(c.text for c in result.choices)
    assert result.usage.completion_tokens >= 2


@supporting(Feature.SEED)
async def test_seed_repeats(subject: Subject) -> None:
    _, one = await run(subject, FEATURE_JOBS[Feature.SEED]())
    _, two = await run(subject, FEATURE_JOBS[Feature.SEED]())
    assert one.choices[0].text == two.choices[0].text


@supporting(Feature.LOGPROBS)
async def test_logprobs(subject: Subject) -> None:
    _, result = await run(subject, FEATURE_JOBS[Feature.LOGPROBS]())
    logprobs = result.choices[0].logprobs
    assert len(logprobs) == result.usage.completion_tokens
    for lp in logprobs:
        assert lp.logprob <= 0
        assert len(lp.top) == 2
        assert lp.top[0].logprob >= lp.top[1].logprob


@supporting(Feature.GRAMMAR)
async def test_grammar_constrains(subject: Subject) -> None:
    _, result = await run(subject, FEATURE_JOBS[Feature.GRAMMAR]())
    assert result.choices[0].text in ("yes", "no")


@supporting(Feature.JSON_OUTPUT)
async def test_json_schema_output_validates(subject: Subject) -> None:
    _, result = await run(subject, FEATURE_JOBS[Feature.JSON_OUTPUT]())
    value = json.loads(result.choices[0].text)
    assert isinstance(value["name"], str)
    assert isinstance(value["age"], int)


@supporting(Feature.TOOLS)
async def test_tool_call(subject: Subject) -> None:
    events, result = await run(subject, FEATURE_JOBS[Feature.TOOLS]())
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.tool_calls[0].name == "get_weather"
    assert isinstance(json.loads(choice.tool_calls[0].arguments), dict)
    fragments = [e for e in events if isinstance(e, ToolCallDelta) and e.call_index == 0]
    assert fragments[0].id
    assert fragments[0].name == "get_weather"
    assert all(f.id is None and f.name is None for f in fragments[1:])


@supporting(Feature.ECHO)
async def test_echo(subject: Subject) -> None:
    _, result = await run(subject, FEATURE_JOBS[Feature.ECHO]())
    assert result.choices[0].text.startswith("Once upon a time")
    assert len(result.choices[0].text) > len("Once upon a time")


@pytest.mark.parametrize(
    ("engine", "feature"),
    [(engine, feature) for engine in sorted(TEXT_MODELS) for feature in sorted(set(FEATURE_JOBS) - declared(engine))],
)
async def test_undeclared_features_are_refused_before_queueing(engine: str, feature: Feature) -> None:
    # admission's check needs the engine class and the config, no loaded model (an indirect parameter of
    # the module's subject would load one per case: pytest caches it by the parameter's position)
    with pytest.raises(UnsupportedParameter) as error:
        check_job(engine_class(engine), model_config(TEXT_MODELS[engine]()), FEATURE_JOBS[feature]())
    assert error.value.param


@pytest.mark.parametrize(
    ("subject", "feature"),
    [
        (engine, f)
        for engine in sorted(TEXT_MODELS)
        for f in sorted(declared(engine) & set(FEATURE_JOBS) - TESTED_IN_DEPTH)
    ],
    indirect=["subject"],
)
async def test_declared_feature_is_served(subject: Subject, feature: Feature) -> None:
    """A declared feature without a test of its own: admission lets it through and the engine serves it,
    or, where it depends on the model (fill in the middle needs FIM tokens), refuses it naming the param."""
    job = FEATURE_JOBS[feature]()
    subject.check(job)
    outcome: GenerationResult | UnsupportedParameter
    try:
        _, outcome = await run(subject, job)
    except UnsupportedParameter as refused:
        outcome = refused
    if isinstance(outcome, UnsupportedParameter):
        assert (feature, outcome.param) in job.features_used()
        return
    result = outcome
    assert all(choice.finish_reason for choice in result.choices)
    assert result.usage.completion_tokens > 0


async def test_every_text_feature_has_a_job_that_uses_it() -> None:
    text_features = set(Feature) - {Feature.TOKEN_INPUT, Feature.TRANSLATION, Feature.WORD_TIMESTAMPS}
    assert set(FEATURE_JOBS) == text_features
    for feature, make in FEATURE_JOBS.items():
        assert feature in {used for used, _ in make().features_used()}, feature
