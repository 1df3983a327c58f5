"""Generation orchestration: the choices of one job, best_of candidates, reasoning and tool-call runs.

Choices made here, and why:
- ``n`` choices run one after the other on the one context: each reuses the evaluated prompt (the KV
  cache keeps it), so n choices cost one prompt evaluation.
- best_of generates every candidate in full, buffered, and keeps the ``n`` with the highest mean token
  logprob; every candidate's tokens count in Usage, as with OpenAI.
- Chat text goes through the reasoning split (a thinking model's ``<think>`` part becomes ReasoningDelta
  events, reasoning.py) and, with tool_choice ``auto``, a watch for the start of a call in the model
  family's syntax (tools/trigger.py); text that could still be either is held back.
- Tool calls: ``required`` and a named function constrain the answer by the call grammar from its first
  token. ``auto`` lets the model write freely; once a call starts, the answer goes on under the grammar
  from the text before the call (the prompt and that text stay in the KV cache, so only the few tokens of
  the call's opening are generated again). What the calls then become (streamed fragments, dropped
  repeats, finish reasons, broken output returned as content) is tools/calls.py's.
"""

from __future__ import annotations

import codecs
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from lllmsd.core.jobs import ChoiceEnd, GenerationEvent, ReasoningDelta, TextDelta, ToolCallDelta, Usage
from lllmsd.engines.llama_cpp.reasoning import ReasoningSplit
from lllmsd.engines.llama_cpp.sampling import Decoder, Outcome, Plan, seed_for
from lllmsd.engines.llama_cpp.tools.calls import CallFragment, CallTracker
from lllmsd.engines.llama_cpp.tools.syntax import CallSyntax
from lllmsd.engines.llama_cpp.tools.trigger import TriggerWatch
from lllmsd.engines.textstream import TextStream


@dataclass(frozen=True, slots=True)
class ToolRun:
    """How a chat job's tool calls run: the grammar-constrained plan, and what the tracker needs."""

    plan: Plan
    syntax: CallSyntax
    names: frozenset[str]
    parallel: bool
    live: bool  # the client streams: fragments go out as they come
    forced: bool  # required / a named function: the grammar from the first token


@dataclass(frozen=True, slots=True)
class ChatText:
    """What a chat choice does with its text: split reasoning out (``thinking``: the prompt opened it
    already), and the tokenizer that continues the prompt with text (for a call that starts mid-answer)."""

    split_reasoning: bool
    thinking: bool
    tokenize: Callable[[str], list[int]]


@dataclass(slots=True)
class Candidate:
    """A best_of candidate, buffered until the best ones are known."""

    events: list[GenerationEvent] = field(default_factory=list)
    outcome: Outcome | None = None

    @property
    def score(self) -> float:
        if self.outcome is None or not self.outcome.tokens:
            return -math.inf
        return self.outcome.logprob_sum / self.outcome.tokens


def generate(
    decoder: Decoder,
    prompt: list[int],
    plan: Plan,
    n: int,
    cancel: threading.Event,
    *,
    tools: ToolRun | None = None,
    chat: ChatText | None = None,
    prefix: str | None = None,
) -> Iterator[GenerationEvent]:
    """``n`` choices one after the other (each reuses the evaluated prompt), then Usage. ``tools``: how
    tool calls run (from the start, or once the text turns out to be a call); ``chat``: a chat answer's
    reasoning split."""
    cached: int | None = None
    completion = 0
    for choice in range(n):
        if prefix:
            yield TextDelta(prefix, choice=choice)
        outcome = yield from _run_choice(decoder, prompt, plan, choice, cancel, tools, chat)
        cached = outcome.cached if cached is None else cached
        completion += outcome.tokens
        if outcome.finish is None:
            return  # cancelled: the consumer is gone
        yield ChoiceEnd(outcome.finish, choice=choice)
    yield Usage(len(prompt), completion, cached or 0)


def best_of(
    decoder: Decoder,
    prompt: list[int],
    plan: Plan,
    n: int,
    candidates_wanted: int,
    cancel: threading.Event,
    prefix: str | None,
) -> Iterator[GenerationEvent]:
    """Generate ``candidates_wanted`` candidates, keep the ``n`` with the highest mean token logprob."""
    candidates = []
    for index in range(candidates_wanted):
        candidate = Candidate()
        runner = _run_choice(decoder, prompt, plan, index, cancel, None, None, score=True)
        candidate.outcome = _drain(runner, candidate.events)
        if candidate.outcome.finish is None:
            return
        candidates.append(candidate)
    ranked = sorted(candidates, key=lambda c: c.score, reverse=True)[:n]
    for choice, candidate in enumerate(ranked):
        if prefix:
            yield TextDelta(prefix, choice=choice)
        for event in candidate.events:
            yield replace(event, choice=choice)  # type: ignore[type-var]
        assert candidate.outcome is not None
        yield ChoiceEnd(candidate.outcome.finish or "stop", choice=choice)
    completion = sum(c.outcome.tokens for c in candidates if c.outcome is not None)
    cached = candidates[0].outcome.cached if candidates and candidates[0].outcome else 0
    yield Usage(len(prompt), completion, cached)


def _run_choice(
    decoder: Decoder,
    prompt: list[int],
    plan: Plan,
    choice: int,
    cancel: threading.Event,
    tools: ToolRun | None,
    chat: ChatText | None,
    score: bool = False,
) -> Iterator[GenerationEvent]:
    if tools is not None and tools.forced:
        return (yield from _run_tools(decoder, prompt, tools, tools.plan, choice, cancel))
    watch = TriggerWatch(tools.syntax) if tools is not None else None
    outcome = yield from _run_text(decoder, prompt, plan, choice, cancel, chat=chat, watch=watch, score=score)
    if outcome.tool_trigger is not None and tools is not None and chat is not None and outcome.finish is not None:
        # The call goes on under the grammar from the text before it (still in the KV cache).
        before = chat.tokenize(outcome.tool_trigger)
        budget = None if plan.max_tokens is None else max(plan.max_tokens - outcome.tokens, 1)
        rerun = yield from _run_tools(
            decoder, prompt + before, tools, replace(tools.plan, max_tokens=budget), choice, cancel
        )
        rerun.cached = outcome.cached
        rerun.tokens += outcome.tokens
        return rerun
    return outcome


def _run_text(
    decoder: Decoder,
    prompt: list[int],
    plan: Plan,
    choice: int,
    cancel: threading.Event,
    *,
    chat: ChatText | None = None,
    watch: TriggerWatch | None = None,
    score: bool = False,
) -> Iterator[GenerationEvent]:
    """One text choice; returns its Outcome (as the generator's value). With ``watch``, a call starting in
    the text ends the choice with ``outcome.tool_trigger`` set to the raw text before the call."""
    cached = decoder.evaluate(prompt, cancel)
    outcome = Outcome(cached=cached or 0)
    if cached is None:
        return outcome
    stream = TextStream(plan.stops, plan.text_offset)
    split = ReasoningSplit(inside=chat.thinking) if chat is not None and chat.split_reasoning else None
    seed = seed_for(plan.sampling, choice)

    def route(text: str, logprobs: tuple, final: bool = False) -> Iterator[GenerationEvent]:
        reasoning, content = split.feed(text) if split is not None else ("", text)
        if final and split is not None:
            more_reasoning, more_content = split.flush()
            reasoning, content = reasoning + more_reasoning, content + more_content
        if reasoning:
            yield ReasoningDelta(reasoning, choice=choice)
        if watch is not None:
            content = watch.feed(content)
            if final:
                content += watch.flush()
        if content or logprobs:
            yield TextDelta(content, choice=choice, logprobs=logprobs)

    for piece, logprob in decoder.tokens(prompt, plan, seed, cancel, outcome, score=score):
        stream.feed(piece, logprob)
        text, logprobs = stream.release()
        yield from route(text, logprobs)
        if watch is not None and watch.call_start is not None:
            # the raw text generated before the call: what was released, less the call's part
            released = stream.text[: stream.sent]
            outcome.tool_trigger = released[: len(released) - (len(watch.text) - watch.call_start)]
            outcome.finish = outcome.finish or "stop"
            return outcome
        if stream.stopped:
            outcome.finish = "stop"
            break
    if outcome.finish is not None:
        text, logprobs = stream.flush()
        yield from route(text, logprobs, final=True)
    return outcome


def _run_tools(
    decoder: Decoder, prompt: list[int], tools: ToolRun, plan: Plan, choice: int, cancel: threading.Event
) -> Iterator[GenerationEvent]:
    """One choice constrained to tool calls by ``plan``'s grammar, as ToolCallDelta fragments (and, for
    output that is no call after all, text)."""
    cached = decoder.evaluate(prompt, cancel)
    outcome = Outcome(cached=cached or 0)
    if cached is None:
        return outcome
    utf8 = codecs.getincrementaldecoder("utf-8")("replace")
    tracker = CallTracker(tools.syntax, tools.names, live=tools.live, parallel=tools.parallel)
    seed = seed_for(plan.sampling, choice)
    for piece, _ in decoder.tokens(prompt, plan, seed, cancel, outcome, score=False):
        for fragment in tracker.feed(utf8.decode(piece)):
            yield _call_delta(fragment, choice)
        if tracker.stop:
            outcome.finish = "stop"
            break
    if outcome.finish is None:
        return outcome  # cancelled
    tracker.feed(utf8.decode(b"", final=True))
    end = tracker.finish("length" if outcome.finish == "length" else "stop")
    for fragment in end.fragments:
        yield _call_delta(fragment, choice)
    if end.content:
        yield TextDelta(end.content, choice=choice)
    outcome.finish = end.finish_reason
    return outcome


def _call_delta(fragment: CallFragment, choice: int) -> ToolCallDelta:
    return ToolCallDelta(fragment.index, fragment.arguments, id=fragment.id, name=fragment.name, choice=choice)


def _drain(runner: Iterator[GenerationEvent], into: list[GenerationEvent]) -> Outcome:
    """Run a choice generator to its end, keeping its events; returns its Outcome."""
    while True:
        try:
            into.append(next(runner))
        except StopIteration as stop:
            return stop.value
