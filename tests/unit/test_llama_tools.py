"""Tool calls in each family's syntax, read back whole and cut into stream fragments at every byte:
detection from chat templates, the grammar, the parser, the trigger watch and the per-answer rules
(repeats, truncation, malformed output, parallel calls). Pure logic: no model."""

from __future__ import annotations

import codecs
import itertools
import json

import pytest

from lllmsd.core.jobs import ToolSpec
from lllmsd.engines.llama_cpp.tools.call_grammar import call_grammar
from lllmsd.engines.llama_cpp.tools.calls import CallFragment, CallsEnd, CallTracker
from lllmsd.engines.llama_cpp.tools.formats import detect_syntax, tool_format, tool_instructions
from lllmsd.engines.llama_cpp.tools.parse import parse_calls
from lllmsd.engines.llama_cpp.tools.syntax import GENERIC, HERMES, LLAMA3, MISTRAL, SYNTAXES, CallSyntax
from lllmsd.engines.llama_cpp.tools.trigger import TriggerWatch

FAMILIES = [HERMES, LLAMA3, MISTRAL, GENERIC]
NAMES = frozenset({"get_weather", "get_time"})
PARIS = ("get_weather", '{"city": "Paris", "unit": "celsius"}')
TOKYO = ("get_time", '{"city": "東京", "zone": {"utc": 9, "dst": false}, "tags": ["a b", "c\\"d"]}')


def compact(arguments: str) -> str:
    return json.dumps(json.loads(arguments), separators=(",", ":"), ensure_ascii=False)


def ids() -> itertools.count:
    return itertools.count()


def run(syntax: CallSyntax, pieces: list[bytes], *, live: bool, reason: str = "stop", parallel: bool = True):
    """Feed ``pieces`` of UTF-8 bytes as generate.py does; returns (fragments, end, stopped early)."""
    counter = itertools.count()
    tracker = CallTracker(syntax, NAMES, live=live, parallel=parallel, new_id=lambda: f"call_{next(counter)}")
    utf8 = codecs.getincrementaldecoder("utf-8")("replace")
    fragments: list[CallFragment] = []
    stopped = False
    for piece in pieces:
        fragments += tracker.feed(utf8.decode(piece))
        if tracker.stop:
            stopped = True
            break
    fragments += tracker.feed(utf8.decode(b"", final=True))
    end = tracker.finish(reason)
    return fragments + end.fragments, end, stopped


def assemble(fragments: list[CallFragment]) -> list[tuple[str, str, str]]:
    """(id, name, arguments) per call, checking that each call's first fragment carries id and name and
    no later one does."""
    calls: dict[int, list[str]] = {}
    for fragment in fragments:
        if fragment.index not in calls:
            assert fragment.id is not None, fragment
            assert fragment.name is not None, fragment
            assert fragment.index == len(calls)  # indexes come in order: 0, 1, ...
            calls[fragment.index] = [fragment.id, fragment.name, fragment.arguments]
        else:
            assert fragment.id is None, fragment
            assert fragment.name is None, fragment
            calls[fragment.index][2] += fragment.arguments
    return [tuple(c) for c in calls.values()]  # type: ignore[misc]


def cuts(data: bytes) -> list[list[bytes]]:
    """The text whole, byte by byte, and cut in two at every byte."""
    return [[data], [data[i : i + 1] for i in range(len(data))]] + [[data[:i], data[i:]] for i in range(1, len(data))]


# ------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("syntax", FAMILIES, ids=lambda s: s.family)
@pytest.mark.parametrize("live", [True, False])
def test_two_calls_read_back_the_same_whatever_the_cuts(syntax: CallSyntax, live: bool) -> None:
    data = syntax.calls_text([PARIS, TOKYO]).encode()
    for pieces in cuts(data):
        fragments, end, _ = run(syntax, pieces, live=live)
        calls = assemble(fragments)
        expected = [(PARIS[0], compact(PARIS[1])), (TOKYO[0], compact(TOKYO[1]))]
        assert [(name, args) for _, name, args in calls] == expected
        assert calls[0][0] != calls[1][0]
        assert end == CallsEnd(end.fragments, "", "tool_calls")


@pytest.mark.parametrize("syntax", FAMILIES, ids=lambda s: s.family)
def test_a_streamed_call_starts_with_id_and_name_and_its_arguments_come_in_fragments(syntax: CallSyntax) -> None:
    data = syntax.calls_text([PARIS, TOKYO]).encode()
    fragments, _, _ = run(syntax, [data[i : i + 1] for i in range(len(data))], live=True)
    for index in (0, 1):
        mine = [f for f in fragments if f.index == index]
        assert mine[0].name == (PARIS, TOKYO)[index][0]
        assert len(mine) > 5


@pytest.mark.parametrize("syntax", FAMILIES, ids=lambda s: s.family)
def test_every_prefix_parses_without_error(syntax: CallSyntax) -> None:
    text = syntax.calls_text([PARIS, TOKYO])
    for end in range(len(text) + 1):
        parsed = parse_calls(text[:end], syntax)
        assert parsed.state != "malformed", (text[:end], parsed)
        for call in parsed.calls:
            assert compact(PARIS[1]).startswith(call.arguments) or compact(TOKYO[1]).startswith(call.arguments)


def test_whitespace_and_the_other_argument_key_are_tolerated() -> None:
    text = '<tool_call>  {\n "name" : "get_weather" ,\n "parameters" : { "city" : "Paris" } }  </tool_call>'
    parsed = parse_calls(text, HERMES)
    assert [(c.name, c.arguments, c.complete) for c in parsed.calls] == [("get_weather", '{"city":"Paris"}', True)]
    spaced = '<|python_tag|> { "name": "get_time", "arguments": {} }'
    assert parse_calls(spaced, LLAMA3).calls[0].complete


# ---------------------------------------------------------------------------------- the answer's rules


@pytest.mark.parametrize("syntax", FAMILIES, ids=lambda s: s.family)
@pytest.mark.parametrize("live", [True, False])
def test_an_exact_repeat_is_dropped_and_stops_the_answer(syntax: CallSyntax, live: bool) -> None:
    if syntax.close:  # a list: the repeat is inside it
        data = (syntax.open + syntax.separator.join([syntax.call_text(*PARIS)] * 2) + syntax.close).encode()
    else:
        data = syntax.calls_text([PARIS, PARIS]).encode()
    fragments, end, stopped = run(syntax, [data[i : i + 1] for i in range(len(data))], live=live)
    assert stopped
    assert [(n, a) for _, n, a in assemble(fragments)] == [(PARIS[0], compact(PARIS[1]))]
    assert end.finish_reason == "tool_calls"
    assert end.content == ""


@pytest.mark.parametrize("syntax", FAMILIES, ids=lambda s: s.family)
@pytest.mark.parametrize("live", [True, False])
def test_a_repeat_cut_off_by_max_tokens_is_not_returned_and_the_answer_is_tool_calls(
    syntax: CallSyntax, live: bool
) -> None:
    whole = syntax.calls_text([PARIS, PARIS])
    first = syntax.calls_text([PARIS])
    if syntax.close:
        first = first[: -len(syntax.close)]
    for end_at in range(len(first), len(whole) - 1):
        data = whole[:end_at].encode()
        fragments, end, _ = run(syntax, [data[i : i + 1] for i in range(len(data))], live=live, reason="length")
        assert [(n, a) for _, n, a in assemble(fragments)] == [(PARIS[0], compact(PARIS[1]))], whole[:end_at]
        assert (end.finish_reason, end.content) == ("tool_calls", ""), whole[:end_at]


@pytest.mark.parametrize("syntax", FAMILIES, ids=lambda s: s.family)
def test_a_complete_call_then_whitespace_at_max_tokens_is_tool_calls(syntax: CallSyntax) -> None:
    data = (syntax.calls_text([PARIS]) + "\n \n").encode()
    fragments, end, _ = run(syntax, [data], live=False, reason="length")
    assert len(assemble(fragments)) == 1
    assert end.finish_reason == "tool_calls"


@pytest.mark.parametrize("syntax", FAMILIES, ids=lambda s: s.family)
def test_a_truncated_call_is_not_a_call_but_content_with_length(syntax: CallSyntax) -> None:
    whole = syntax.calls_text([TOKYO])
    for end_at in range(1, len(whole) - len(syntax.close) - len(syntax.call_close) - 1):
        fragments, end, _ = run(syntax, [whole[:end_at].encode()], live=False, reason="length")
        assert fragments == []
        assert (end.content, end.finish_reason) == (whole[:end_at], "length")


def test_a_truncated_second_call_that_differs_ends_with_length_after_the_first() -> None:
    text = HERMES.calls_text([PARIS, TOKYO])[:-30]
    fragments, end, _ = run(HERMES, [text.encode()], live=False, reason="length")
    assert [n for _, n, _ in assemble(fragments)] == ["get_weather"]
    assert end.finish_reason == "length"
    assert end.content.startswith("<tool_call>")
    assert "get_time" in end.content
    # streamed, the second call's start has been seen: it stays a (cut) call, and the answer is "length"
    fragments, end, _ = run(HERMES, [text.encode()], live=True, reason="length")
    assert [n for _, n, _ in assemble(fragments)] == ["get_weather", "get_time"]
    assert (end.finish_reason, end.content) == ("length", "")


def test_a_second_call_to_the_same_function_is_held_until_it_differs() -> None:
    other = ("get_weather", '{"city": "Paris", "unit": "fahrenheit"}')
    data = HERMES.calls_text([PARIS, other]).encode()
    tracker = CallTracker(HERMES, NAMES, live=True)
    seen: list[CallFragment] = []
    text = ""
    for i in range(len(data)):
        text += data[i : i + 1].decode()
        seen += tracker.feed(data[i : i + 1].decode())
        second = [f for f in seen if f.index == 1]
        if second:
            assert '"unit": "f' in text  # not before the arguments differ from the first call's
            break
    else:
        raise AssertionError("the second call was never streamed")


def test_parallel_false_ends_the_answer_at_the_first_call() -> None:
    data = HERMES.calls_text([PARIS, TOKYO]).encode()
    fragments, end, stopped = run(HERMES, [data[i : i + 1] for i in range(len(data))], live=True, parallel=False)
    assert stopped
    assert [n for _, n, _ in assemble(fragments)] == ["get_weather"]
    assert end.finish_reason == "tool_calls"


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": tru}}\n</tool_call>',  # not JSON
        '<tool_call>\n{"arguments": {}, "name": "get_weather"}\n</tool_call>',  # arguments first
        '<tool_call>\n{"name": "get_weather", "arguments": "Paris"}\n</tool_call>',  # not an object
        "<tool_call>\nI will look that up.",
    ],
)
def test_malformed_output_becomes_content_with_stop(text: str) -> None:
    for live in (True, False):
        fragments, end, _ = run(HERMES, [text.encode()], live=live)
        assert fragments == []
        assert (end.content, end.finish_reason) == (text, "stop")


def test_an_unknown_function_becomes_content() -> None:
    text = HERMES.calls_text([("rm_rf", "{}")])
    fragments, end, stopped = run(HERMES, [text.encode()], live=True)
    assert stopped
    assert fragments == []
    assert (end.content, end.finish_reason) == (text, "stop")


def test_text_after_complete_calls_is_content_and_the_calls_stay() -> None:
    text = HERMES.calls_text([PARIS]) + "\nDone, I hope."
    fragments, end, _ = run(HERMES, [text.encode()], live=False)
    assert [n for _, n, _ in assemble(fragments)] == ["get_weather"]
    assert end.content.strip() == "Done, I hope."
    assert end.finish_reason == "tool_calls"


# --------------------------------------------------------------------------------------- the trigger


@pytest.mark.parametrize("syntax", [HERMES, MISTRAL, GENERIC], ids=lambda s: s.family)
def test_text_before_a_call_is_content_and_the_trigger_never_leaks(syntax: CallSyntax) -> None:
    before = "Let me check < that > for you. "
    text = before + syntax.calls_text([PARIS])
    for split in range(len(text) + 1):
        watch = TriggerWatch(syntax)
        shown = watch.feed(text[:split]) + watch.feed(text[split:])
        assert shown == before
        assert text[watch.call_start :].startswith(syntax.triggers[0])


def test_llama3_calls_only_start_the_answer() -> None:
    call = LLAMA3.call_text(*PARIS)
    for text in (call, "  " + call, "<|python_tag|>" + call, '{ "name": "get_weather", "parameters": {}}'):
        watch = TriggerWatch(LLAMA3)
        assert "".join(watch.feed(c) for c in text) == ""
        assert watch.call_start == 0
    watch = TriggerWatch(LLAMA3)
    text = 'Here is JSON: {"name": "x"}'
    assert "".join(watch.feed(c) for c in text) + watch.flush() == text
    assert watch.call_start is None
    watch = TriggerWatch(LLAMA3)
    assert watch.feed('{"na') == ""
    assert watch.feed("me?") + watch.flush() == '{"name?'


# -------------------------------------------------------------------------------- grammar, detection


@pytest.mark.parametrize("syntax", FAMILIES, ids=lambda s: s.family)
def test_the_grammar_writes_the_family_syntax(syntax: CallSyntax) -> None:
    tools = (ToolSpec("get_weather", parameters={"type": "object"}), ToolSpec("get_time"))
    single, parallel = call_grammar(tools, syntax, False), call_grammar(tools, syntax, True)
    assert single.startswith("root ::= ")
    assert "call (" not in single.splitlines()[0]
    assert f"call ( {json.dumps(syntax.separator)} call )*" in parallel
    for grammar in (single, parallel):
        assert json.dumps(syntax.call_open + '{"name": "') in grammar
        assert json.dumps('get_time", "' + syntax.args_key + '": ') in grammar
        if syntax.open:
            assert grammar.startswith(f"root ::= {json.dumps(syntax.open)}")


HERMES_TEMPLATE = "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}<tool_call>"
TEMPLATES = {
    "qwen3": ("{%- if tools %}{{ tool }}{% endif %}<tool_call>\n<think>\n", "hermes", True, True),
    "hermes": (HERMES_TEMPLATE, "hermes", True, False),
    "mistral": ("{% if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]", "mistral", True, False),
    "llama3.1": ('{% if tools %}<|start_header_id|>"parameters"{% endif %}<|python_tag|>', "llama3", True, False),
    "llama3 json": ('{% for t in tools %}<|start_header_id|> "parameters" {% endfor %}', "llama3", True, False),
    "chatml": ("{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}", "generic", False, False),
    "deepseek-r1 distill": ("{% for m in messages %}{{ m.content }}{% endfor %}<think>\n", "generic", False, True),
}


@pytest.mark.parametrize("name", TEMPLATES)
def test_the_family_is_detected_from_the_template(name: str) -> None:
    template, family, native, thinks = TEMPLATES[name]
    found = tool_format(template)
    assert (found.family, found.native, found.thinks) == (family, native, thinks)
    assert detect_syntax(template).family == family


def test_tool_format_overrides_detection_and_a_template_without_tools_is_never_native() -> None:
    assert tool_format(HERMES_TEMPLATE, "mistral").family == "mistral"
    no_tools = "<tool_call> in a template that never reads the variable"
    assert tool_format(no_tools).family == "hermes"
    assert not tool_format(no_tools).native
    assert not tool_format(None, "llama3").native
    assert set(SYNTAXES) == {"hermes", "llama3", "mistral", "generic"}


def test_instructions_name_every_tool_and_show_the_family_syntax() -> None:
    tools = (ToolSpec("get_weather", "Weather", {"type": "object"}), ToolSpec("get_time"))
    for syntax in FAMILIES:
        text = tool_instructions(tools, syntax)
        assert '"name": "get_weather"' in text
        assert '"name": "get_time"' in text
        assert syntax.calls_text([("<function name>", "<arguments as a JSON object>")]) in text
