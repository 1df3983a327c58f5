"""Responses requests as chat jobs: input items to messages, truncation, and parameter names in errors."""

from __future__ import annotations

from typing import Any

import pytest

from lllmsd.api.schemas.response_items import items_to_messages
from lllmsd.api.schemas.responses import ResponseCreateRequest, in_responses_terms
from lllmsd.core.jobs import ChatMessage, ToolCall
from lllmsd.errors import ContextLengthExceeded, UnsupportedParameter


def request(**body: Any) -> ResponseCreateRequest:
    return ResponseCreateRequest.model_validate({"model": "m", **body})


def test_items_become_chat_messages() -> None:
    body = request(
        input=[
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "input_text", "text": "weather "}, {"type": "input_text", "text": "?"}],
            },
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look."}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
            {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": "{}"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "noon"}]},
        ]
    )
    calls = (ToolCall("call_1", "get_weather", '{"city":"Oslo"}'), ToolCall("call_2", "get_time", "{}"))
    assert body.turn().new_messages == (
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "weather ?"),
        ChatMessage("assistant", "Let me look.", tool_calls=calls),  # one assistant turn: its text and calls
        ChatMessage("tool", "sunny", name="get_weather", tool_call_id="call_1"),
        ChatMessage("tool", "noon", name="get_time", tool_call_id="call_2"),
    )


def test_a_function_output_finds_its_call_in_the_stored_history() -> None:
    before = (ChatMessage("assistant", None, tool_calls=(ToolCall("call_9", "lookup", "{}"),)),)
    (message,) = items_to_messages(
        request(input=[{"type": "function_call_output", "call_id": "call_9", "output": "x"}])._input_items(), before
    )
    assert message == ChatMessage("tool", "x", name="lookup", tool_call_id="call_9")


def test_instructions_lead_and_are_not_part_of_the_stored_conversation() -> None:
    history = (ChatMessage("user", "one"), ChatMessage("assistant", "one"))
    turn = request(instructions="Be brief.", input="two").turn(history)
    assert turn.conversation == (*history, ChatMessage("user", "two"))
    assert turn.messages() == (ChatMessage("system", "Be brief."), *turn.conversation)


def test_truncation_drops_history_never_the_new_input() -> None:
    history = tuple(ChatMessage("user", str(n)) for n in range(5))
    turn = request(input="new").turn(history)
    two = turn.truncated(2)
    assert two is not None
    assert two.messages() == (*history[2:], ChatMessage("user", "new"))
    everything = two.truncated(100)
    assert everything is not None
    assert everything.messages() == (ChatMessage("user", "new"),)
    assert everything.truncated(1) is None
    assert request(input="new").turn().truncated() is None


def test_input_item_records_have_ids_and_parts() -> None:
    turn = request(
        input=[{"role": "user", "content": "hi"}, {"type": "function_call_output", "call_id": "c", "output": "o"}]
    ).turn()
    message, output = turn.input_items
    assert message["id"].startswith("msg_")
    assert message["content"] == [{"type": "input_text", "text": "hi"}]
    assert output["id"].startswith("fco_")
    assert output["status"] == "completed"


@pytest.mark.parametrize(
    ("error", "param"),
    [
        (UnsupportedParameter("response_format", "fake"), "text.format"),
        (UnsupportedParameter("messages", "fake"), "input"),
        (ContextLengthExceeded(10, 5), "input"),
        (ContextLengthExceeded(10, 5, param="max_tokens"), "max_output_tokens"),
        (UnsupportedParameter("seed", "fake"), "seed"),
    ],
)
def test_errors_name_parameters_the_responses_way(error: Any, param: str) -> None:
    renamed = in_responses_terms(error)
    assert renamed.param == param
    if isinstance(error, UnsupportedParameter):
        assert f"'{param}'" in renamed.message
