"""Pure logic of the engine-neutral vocabulary: context matching and collecting a generation."""

from __future__ import annotations

from lllmsd.core.jobs import (
    EMPTY_CONTEXT,
    ChatJob,
    ChatMessage,
    ChoiceEnd,
    CompletionJob,
    Context,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
    Usage,
    collect_generation,
    context_after,
)

SYSTEM = ChatMessage("system", "be brief")
HELLO = ChatMessage("user", "hello")


def test_chat_contexts_match_by_whole_messages() -> None:
    cached = Context.of_messages([SYSTEM, HELLO, ChatMessage("assistant", "hi")])
    follow_up = Context.of_messages([SYSTEM, HELLO, ChatMessage("assistant", "hi"), ChatMessage("user", "more")])
    other = Context.of_messages([SYSTEM, ChatMessage("user", "bye")])
    assert cached.match_length(follow_up) == 3
    assert cached.match_length(other) == 1
    assert EMPTY_CONTEXT.match_length(follow_up) == 0


def test_text_contexts_match_by_characters_and_kinds_never_mix() -> None:
    cached = Context.of_text("Once upon a time")
    assert cached.match_length(Context.of_text("Once upon a midnight")) == len("Once upon a ")
    assert cached.match_length(Context.of_messages([HELLO])) == 0


def test_context_after_appends_the_reply() -> None:
    chat = ChatJob(messages=(HELLO,))
    after = context_after(chat, "hi there")
    assert after == Context.of_messages([HELLO, ChatMessage("assistant", "hi there")])
    assert context_after(CompletionJob(prompt="one two"), " three") == Context.of_text("one two three")


def test_collect_generation_folds_choices_tool_calls_and_usage() -> None:
    logprob = TokenLogprob("a", -0.5)
    events = [
        TextDelta("Hel", choice=0, logprobs=(logprob,)),
        TextDelta("Other", choice=1),
        TextDelta("lo", choice=0),
        ToolCallDelta(0, '{"x":', id="call_1", name="f", choice=1),
        ToolCallDelta(0, "1}", choice=1),
        ChoiceEnd("stop", choice=0),
        ChoiceEnd("tool_calls", choice=1),
        Usage(7, 3, cached_tokens=2),
    ]
    result = collect_generation(events, n=2)
    first, second = result.choices
    assert (first.text, first.finish_reason, first.logprobs) == ("Hello", "stop", (logprob,))
    assert second.finish_reason == "tool_calls"
    assert [(c.id, c.name, c.arguments) for c in second.tool_calls] == [("call_1", "f", '{"x":1}')]
    assert (result.usage.prompt_tokens, result.usage.total_tokens, result.usage.cached_tokens) == (7, 10, 2)
