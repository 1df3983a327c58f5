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

Tool definitions go into the system prompt (grammar.py's ``tool_instructions``); tool calls and tool
results in the history are written in the engine's own tool-call format, whatever the template knows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import llama_cpp
from llama_cpp import llama_chat_format

from lllmsd.core.jobs import ChatMessage, ToolSpec
from lllmsd.engines.llama_cpp.grammar import tool_call_text, tool_instructions
from lllmsd.engines.llama_cpp.model import tokenize
from lllmsd.errors import InvalidRequest

FALLBACK_CHAT_FORMAT = "chatml"
TEMPLATE_PREFIX = "chat_template."  # a GGUF's named templates: tokenizer.chat_template.<name>
TEMPLATE_KEY = "tokenizer.chat_template"

Formatter = Callable[..., Any]


def chat_format_problems(name: str | None) -> list[str]:
    """What is wrong with a config's ``chat_format``, found at config load without the weights."""
    if name is None or name.startswith(TEMPLATE_PREFIX):
        return []  # the GGUF's own template(s): only the weights file can tell, when it loads
    found = _registered_formatter(name)
    return [found] if isinstance(found, str) else []


class ChatPrompt:
    """The chat format of one loaded model, rendering messages to prompt tokens."""

    def __init__(self, llama: llama_cpp.Llama, chat_format: str | None) -> None:
        self._llama = llama
        # (formatter that opens the assistant turn, formatter that does not, if the format allows it)
        self._open, self._closed = _formatters(llama, chat_format)

    def render(
        self, messages: tuple[ChatMessage, ...], tools: tuple[ToolSpec, ...], *, open_turn: bool
    ) -> tuple[list[int], tuple[str, ...]]:
        """The prompt's tokens and the chat format's own stop strings. ``open_turn`` False leaves the
        assistant turn unopened (a preload, which the next request's messages continue)."""
        formatter = self._open if open_turn or self._closed is None else self._closed
        dicts = [_message_dict(m) for m in messages]
        if tools:
            instructions = tool_instructions(tools)
            if dicts and dicts[0]["role"] == "system":
                dicts[0]["content"] = f"{dicts[0]['content']}\n\n{instructions}"
            else:
                dicts.insert(0, {"role": "system", "content": instructions})
        try:
            rendered = formatter(messages=dicts)
        except Exception as exc:  # a template's raise_exception(), or jinja errors on odd input
            raise InvalidRequest(
                f"the chat template rejected the messages: {exc}", param="messages", code="invalid_value"
            ) from None
        stops = rendered.stop if isinstance(rendered.stop, list) else [rendered.stop]
        tokens = tokenize(self._llama, rendered.prompt, add_bos=not rendered.added_special)
        return tokens, tuple(s for s in stops if s)


def _formatters(llama: llama_cpp.Llama, name: str | None) -> tuple[Formatter, Formatter | None]:
    """(formatter that opens the assistant turn, formatter that does not, if the format allows it)."""
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
        )
    if name is not None and name.startswith(TEMPLATE_PREFIX):
        raise InvalidRequest(f"chat_format {name!r}: the model has no such template", param="chat_format")
    found = _registered_formatter(name or FALLBACK_CHAT_FORMAT)
    if isinstance(found, str):
        raise InvalidRequest(f"chat_format {found}", param="chat_format")
    return found, None


def _registered_formatter(name: str) -> Formatter | str:
    """The ChatFormatter behind one of llama-cpp-python's named chat formats, or why there is none."""
    try:
        handler = llama_chat_format.get_chat_completion_handler(name)
    except Exception:
        return f"{name!r} is not a llama-cpp-python chat format"
    # register_chat_format wraps a formatter in a handler closure; full handlers (function calling,
    # llava) drive generation themselves and cannot be used for rendering only.
    for cell in handler.__closure__ or ():
        value = cell.cell_contents
        if callable(value) and getattr(value, "__name__", "").startswith("format_"):
            return value
    return f"{name!r} is a full chat handler, not a prompt format"


def _message_dict(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates expect it: text content only; tool traffic in this engine's format."""
    content = message.content or ""
    if message.tool_calls:
        calls = "\n".join(tool_call_text(c.name, c.arguments) for c in message.tool_calls)
        content = f"{content}\n{calls}" if content else calls
    if message.role == "tool":
        # Templates differ in what they accept for tool results; a user turn works with all of them.
        return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
    result: dict[str, Any] = {"role": message.role, "content": content}
    if message.name:
        result["name"] = message.name
    return result
