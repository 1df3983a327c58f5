"""Chat messages to prompt tokens: the chat format, and how messages (and tools) are put into it.

The engine renders prompts itself rather than calling ``create_chat_completion``, so that generation can
run token by token (KV reuse, stops, cancellation, logprobs, grammars: see sampling.py). The format is
the GGUF's own Jinja chat template (``chat_format`` null, or ``chat_template.<name>`` for one of the
GGUF's named templates), or a named llama-cpp-python chat format ("chatml", "llama-3", ...); a model
whose GGUF has no template falls back to ChatML.

Only prompt formats can be named: llama-cpp-python also registers full chat handlers (function calling,
llava) under the same names, and those drive generation themselves. ``chat_format_problems`` refuses
them, and unknown names, when the config loads; a ``chat_template.`` name is checked against the GGUF
when the model loads, as only the weights file knows its templates.

Tools: when the model's Jinja template reads ``tools`` (and its family is known: tools/formats.py), the
tool definitions, earlier assistant calls and ``tool`` results go to the template itself, as Hugging Face
templates expect them (``tools`` as OpenAI function specs, a call's arguments as a dict, a tool result
with its ``tool_call_id`` and the function's ``name``). A template that knows nothing of tools gets
instructions in the system prompt (``tool_instructions``), earlier calls written as text in the family's
syntax, and tool results as user turns in ``<tool_response>`` tags, which every template accepts.

``chat_template_kwargs`` and ``reasoning_effort`` are passed to a Jinja template as variables (Qwen 3
reads ``enable_thinking``; others read ``reasoning_effort``); named formats ignore them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import llama_cpp
from llama_cpp import llama_chat_format

from lllmsd.core.jobs import ChatMessage, ToolSpec
from lllmsd.engines.llama_cpp.model import tokenize
from lllmsd.engines.llama_cpp.reasoning import THINK_OPEN
from lllmsd.engines.llama_cpp.tools.formats import AUTO, ToolFormat, tool_format, tool_instructions
from lllmsd.errors import InvalidRequest

FALLBACK_CHAT_FORMAT = "chatml"
TEMPLATE_PREFIX = "chat_template."  # a GGUF's named templates: tokenizer.chat_template.<name>
TEMPLATE_KEY = "tokenizer.chat_template"

Formatter = Callable[..., Any]
# Variables the renderer sets itself: chat_template_kwargs may not replace them.
RESERVED_TEMPLATE_VARIABLES = frozenset(
    {
        "messages",
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "add_generation_prompt",
        "bos_token",
        "eos_token",
        "raise_exception",
        "strftime_now",
    }
)


@dataclass(frozen=True, slots=True)
class RenderedPrompt:
    tokens: list[int]
    stops: tuple[str, ...]  # the chat format's own stop strings
    thinking: bool  # the prompt ends inside an opened <think>: the answer starts with reasoning


def chat_format_problems(name: str | None) -> list[str]:
    """What is wrong with a config's ``chat_format``, found at config load without the weights."""
    if name is None or name.startswith(TEMPLATE_PREFIX):
        return []  # the GGUF's own template(s): only the weights file can tell, when it loads
    found = _registered_formatter(name)
    return [found] if isinstance(found, str) else []


class ChatPrompt:
    """The chat format of one loaded model, rendering messages (and tools) to prompt tokens."""

    def __init__(self, llama: llama_cpp.Llama, chat_format: str | None, tool_format_name: str = AUTO) -> None:
        self._llama = llama
        # (formatter that opens the assistant turn, formatter that does not, if the format allows it)
        self._open, self._closed, template = _formatters(llama, chat_format)
        self.tools = tool_format(template, tool_format_name)

    def render(
        self,
        messages: tuple[ChatMessage, ...],
        tools: tuple[ToolSpec, ...],
        *,
        open_turn: bool,
        template_kwargs: dict[str, Any] | None = None,
        reasoning_effort: str | None = None,
    ) -> RenderedPrompt:
        """The prompt's tokens and the chat format's own stop strings. ``open_turn`` False leaves the
        assistant turn unopened (a preload, which the next request's messages continue)."""
        formatter = self._open if open_turn or self._closed is None else self._closed
        variables = dict(template_kwargs or {})
        reserved = sorted(RESERVED_TEMPLATE_VARIABLES & variables.keys())
        if reserved:
            raise InvalidRequest(
                f"chat_template_kwargs may not set {', '.join(reserved)}",
                param="chat_template_kwargs",
                code="invalid_value",
            )
        if reasoning_effort is not None:
            variables["reasoning_effort"] = reasoning_effort
        fmt = self.tools
        if fmt.native:
            dicts = _native_messages(messages)
            if tools:
                variables["tools"] = [_tool_dict(t) for t in tools]
        else:
            dicts = [_message_dict(m, fmt) for m in messages]
            if tools:
                _add_instructions(dicts, tool_instructions(tools, fmt.syntax))
        try:
            rendered = formatter(messages=dicts, **variables)
        except Exception as exc:  # a template's raise_exception(), or jinja errors on odd input
            raise InvalidRequest(
                f"the chat template rejected the messages: {exc}", param="messages", code="invalid_value"
            ) from None
        stops = rendered.stop if isinstance(rendered.stop, list) else [rendered.stop]
        tokens = tokenize(self._llama, rendered.prompt, add_bos=not rendered.added_special)
        thinking = fmt.thinks and open_turn and rendered.prompt.rstrip().endswith(THINK_OPEN)
        return RenderedPrompt(tokens, tuple(s for s in stops if s), thinking)


def _formatters(llama: llama_cpp.Llama, name: str | None) -> tuple[Formatter, Formatter | None, str | None]:
    """(formatter that opens the assistant turn, formatter that does not if the format allows it, the Jinja
    template if it is one)."""
    metadata = llama.metadata
    key = TEMPLATE_KEY
    if name is not None and name.startswith(TEMPLATE_PREFIX) and name != f"{TEMPLATE_PREFIX}default":
        key = f"tokenizer.{name}"
    if (name is None or name.startswith(TEMPLATE_PREFIX)) and metadata.get(key):
        model = llama._model
        eos = model.token_get_text(model.token_eos()) if model.token_eos() >= 0 else ""
        bos = model.token_get_text(model.token_bos()) if model.token_bos() >= 0 else ""
        make = llama_chat_format.Jinja2ChatFormatter
        return (
            make(template=metadata[key], eos_token=eos, bos_token=bos, add_generation_prompt=True),
            make(template=metadata[key], eos_token=eos, bos_token=bos, add_generation_prompt=False),
            metadata[key],
        )
    if name is not None and name.startswith(TEMPLATE_PREFIX):
        raise InvalidRequest(f"chat_format {name!r}: the model has no such template", param="chat_format")
    found = _registered_formatter(name or FALLBACK_CHAT_FORMAT)
    if isinstance(found, str):
        raise InvalidRequest(f"chat_format {found}", param="chat_format")
    return found, None, None


def _registered_formatter(name: str) -> Formatter | str:
    """The ChatFormatter behind one of llama-cpp-python's named chat formats, or why there is none."""
    try:
        handler = llama_chat_format.get_chat_completion_handler(name)
    except Exception:
        return f"{name!r} is not a llama-cpp-python chat format"
    # register_chat_format wraps a formatter in a handler closure made by
    # chat_formatter_to_chat_completion_handler (the formatter's own name varies: vicuna's is ``format``);
    # full handlers (function calling, llava) drive generation themselves and cannot only render a prompt.
    wrapper = llama_chat_format.chat_formatter_to_chat_completion_handler.__name__
    if getattr(handler, "__qualname__", "").startswith(f"{wrapper}.<locals>."):
        for cell in handler.__closure__ or ():
            if callable(cell.cell_contents):
                return cell.cell_contents
    return f"{name!r} is a full chat handler, not a prompt format"


def _tool_dict(tool: ToolSpec) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name, "parameters": tool.parameters or {"type": "object"}}
    if tool.description:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def _arguments(text: str) -> Any:
    """A call's arguments as templates expect them: a dict (they apply ``tojson``); the text if it is not
    JSON (the template decides)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _native_messages(messages: tuple[ChatMessage, ...]) -> list[dict[str, Any]]:
    """Messages for a template that renders tool traffic itself."""
    names = {c.id: c.name for m in messages for c in m.tool_calls}
    dicts: list[dict[str, Any]] = []
    for message in messages:
        result: dict[str, Any] = {"role": message.role, "content": message.content or ""}
        if message.name:
            result["name"] = message.name
        if message.tool_calls:
            result["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                for c in message.tool_calls
            ]
        if message.role == "tool":
            result["tool_call_id"] = message.tool_call_id
            if message.tool_call_id in names:
                result["name"] = names[message.tool_call_id]
        dicts.append(result)
    return dicts


def _message_dict(message: ChatMessage, fmt: ToolFormat) -> dict[str, Any]:
    """A message for a template that knows nothing of tools: text content only, tool traffic as text."""
    content = message.content or ""
    if message.tool_calls:
        calls = fmt.syntax.calls_text([(c.name, c.arguments) for c in message.tool_calls])
        content = f"{content}\n{calls}" if content else calls
    if message.role == "tool":
        # Templates differ in what they accept for tool results; a user turn works with all of them.
        return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
    result: dict[str, Any] = {"role": message.role, "content": content}
    if message.name:
        result["name"] = message.name
    return result


def _add_instructions(dicts: list[dict[str, Any]], instructions: str) -> None:
    if dicts and dicts[0]["role"] == "system":
        dicts[0]["content"] = f"{dicts[0]['content']}\n\n{instructions}"
    else:
        dicts.insert(0, {"role": "system", "content": instructions})
