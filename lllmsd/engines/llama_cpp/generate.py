"""Generation orchestration: the choices of one job, best_of candidates, and tool-call runs.

Choices made here, and why:
- ``n`` choices run one after the other on the one context: each reuses the evaluated prompt (the KV
  cache keeps it), so n choices cost one prompt evaluation.
- best_of generates every candidate in full, buffered, and keeps the ``n`` with the highest mean token
  logprob; every candidate's tokens count in Usage, as with OpenAI.
- Tool calls: ``required`` and a named function force the tool-call format with a grammar from the first
  token; ``auto`` lets the model start freely and, if its answer starts with ``<tool_call>``, restarts
  the answer under the grammar (the prompt stays cached). Text is held back while it could still be the
  start of a tool call, so a client never sees the aborted text.
"""

from __future__ import annotations

import codecs
import math
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from lllmsd.core.jobs import ChoiceEnd, GenerationEvent, TextDelta, ToolCallDelta, Usage
from lllmsd.engines.llama_cpp.grammar import TOOL_OPEN, parse_tool_calls
from lllmsd.engines.llama_cpp.sampling import Decoder, Outcome, Plan, seed_for
from lllmsd.engines.textstream import TextStream


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
    tools: Plan | None = None,
    auto: bool = False,
    prefix: str | None = None,
) -> Iterator[GenerationEvent]:
    """``n`` choices one after the other (each reuses the evaluated prompt), then Usage. ``tools`` is the
    plan of a tool-call run: from the start, or (``auto``) once the text turns out to be a tool call."""
    cached: int | None = None
    completion = 0
    for choice in range(n):
        if prefix:
            yield TextDelta(prefix, choice=choice)
        outcome = yield from _run_choice(decoder, prompt, plan, choice, cancel, tools, auto)
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
        runner = _run_choice(decoder, prompt, plan, index, cancel, None, False, score=True)
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
    tools: Plan | None,
    auto: bool,
    score: bool = False,
) -> Iterator[GenerationEvent]:
    if tools is not None and not auto:
        return (yield from _run_tools(decoder, prompt, tools, choice, cancel))
    outcome = yield from _run_text(decoder, prompt, plan, choice, cancel, watch_tools=auto, score=score)
    if outcome.tool_trigger and tools is not None:
        rerun = yield from _run_tools(decoder, prompt, tools, choice, cancel)
        rerun.cached = outcome.cached
        return rerun
    return outcome


def _run_text(
    decoder: Decoder,
    prompt: list[int],
    plan: Plan,
    choice: int,
    cancel: threading.Event,
    *,
    watch_tools: bool = False,
    score: bool = False,
) -> Iterator[GenerationEvent]:
    """One text choice; returns its Outcome (as the generator's value)."""
    cached = decoder.evaluate(prompt, cancel)
    outcome = Outcome(cached=cached or 0)
    if cached is None:
        return outcome
    stream = TextStream(plan.stops, plan.text_offset)
    deciding = watch_tools  # tool_choice auto: hold the text until it cannot be a tool call
    seed = seed_for(plan.sampling, choice)
    for piece, logprob in decoder.tokens(prompt, plan, seed, cancel, outcome, score=score):
        stream.feed(piece, logprob)
        if deciding:
            head = stream.text.lstrip()
            if head.startswith(TOOL_OPEN):
                outcome.tool_trigger = True
                return outcome
            deciding = TOOL_OPEN.startswith(head)
        text, logprobs = stream.release(hold_all=deciding)
        if text or logprobs:
            yield TextDelta(text, choice=choice, logprobs=logprobs)
        if stream.stopped:
            outcome.finish = "stop"
            break
    if outcome.finish is not None:
        text, logprobs = stream.flush()
        if text or logprobs:
            yield TextDelta(text, choice=choice, logprobs=logprobs)
    return outcome


def _run_tools(
    decoder: Decoder, prompt: list[int], plan: Plan, choice: int, cancel: threading.Event
) -> Iterator[GenerationEvent]:
    """One choice constrained to tool calls, streamed as ToolCallDelta fragments."""
    cached = decoder.evaluate(prompt, cancel)
    outcome = Outcome(cached=cached or 0)
    if cached is None:
        return outcome
    utf8 = codecs.getincrementaldecoder("utf-8")("replace")
    text = ""
    sent: list[int] = []  # characters of arguments sent, per call
    seed = seed_for(plan.sampling, choice)
    for piece, _ in decoder.tokens(prompt, plan, seed, cancel, outcome, score=False):
        text += utf8.decode(piece)
        for index, (name, arguments, _complete) in enumerate(parse_tool_calls(text)):
            if index == len(sent):
                sent.append(len(arguments))
                yield ToolCallDelta(index, arguments, id=f"call_{secrets.token_hex(12)}", name=name, choice=choice)
            elif len(arguments) > sent[index]:
                yield ToolCallDelta(index, arguments[sent[index] :], choice=choice)
                sent[index] = len(arguments)
    if outcome.finish == "stop":
        outcome.finish = "tool_calls"
    return outcome


def _drain(runner: Iterator[GenerationEvent], into: list[GenerationEvent]) -> Outcome:
    """Run a choice generator to its end, keeping its events; returns its Outcome."""
    while True:
        try:
            into.append(next(runner))
        except StopIteration as stop:
            return stop.value
