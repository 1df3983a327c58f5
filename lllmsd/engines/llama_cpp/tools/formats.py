"""Which call syntax a model uses, found from its chat template, and what the engine does with it.

Detection reads the Jinja chat template the model ships (and falls back to the generic format):
- ``<tool_call>`` in the template: Hermes / Qwen 2.5 / Qwen 3;
- ``[TOOL_CALLS]``: Mistral / Ministral;
- ``<|python_tag|>``, or ``"parameters"`` next to Llama 3's ``<|start_header_id|>`` turns: Llama 3.1-3.3;
- anything else: generic (the Hermes syntax, taught by instructions in the system prompt).
A template *takes tools* when it reads the ``tools`` variable; only then are the tool definitions, earlier
calls and tool results given to the template itself (``native``). A template that does not gets the
generic treatment whatever the family: instructions in the system prompt, calls and results written as
text in the family's syntax. The config's ``tool_format`` overrides the detected syntax.

A model *thinks* when its template mentions ``<think>`` (Qwen 3, DeepSeek-R1 distills, SmolLM3, ...): the
text between ``<think>`` and ``</think>`` is reasoning (reasoning.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from lllmsd.core.jobs import ToolSpec
from lllmsd.engines.llama_cpp.reasoning import THINK_CLOSE, THINK_OPEN
from lllmsd.engines.llama_cpp.tools.syntax import GENERIC, HERMES, LLAMA3, MISTRAL, SYNTAXES, CallSyntax

AUTO = "auto"
TOOL_FORMATS = (AUTO, *SYNTAXES)  # the config's tool_format values
_READS_TOOLS = re.compile(r"\btools\b")


@dataclass(frozen=True, slots=True)
class ToolFormat:
    """How tools work for one loaded model."""

    syntax: CallSyntax
    native: bool  # the chat template renders tools, calls and results itself
    thinks: bool  # the model reasons in <think>...</think>

    @property
    def family(self) -> str:
        return self.syntax.family

    @property
    def shown_markers(self) -> tuple[str, ...]:
        """Texts the parsers must see even where the model has them as control tokens."""
        return (*self.syntax.special_markers, *((THINK_OPEN, THINK_CLOSE) if self.thinks else ()))


def detect_syntax(template: str | None) -> CallSyntax:
    """The call syntax a chat template teaches, or the generic one."""
    text = template or ""
    if "<tool_call>" in text:
        return HERMES
    if "[TOOL_CALLS]" in text:
        return MISTRAL
    if "<|python_tag|>" in text or ("<|start_header_id|>" in text and '"parameters"' in text):
        return LLAMA3
    return GENERIC


def tool_format(template: str | None, override: str = AUTO) -> ToolFormat:
    """The tool format of a model whose chat template is ``template`` (None: a named chat format)."""
    syntax = detect_syntax(template) if override == AUTO else SYNTAXES[override]
    native = bool(template) and _READS_TOOLS.search(template or "") is not None and syntax is not GENERIC
    return ToolFormat(syntax=syntax, native=native, thinks=THINK_OPEN in (template or ""))


def tool_instructions(tools: tuple[ToolSpec, ...], syntax: CallSyntax) -> str:
    """The system-prompt text that tells a model without a tool-aware template which functions exist and
    how to call them, in ``syntax``."""
    lines = ["You can call these functions (their arguments are JSON Schemas):"]
    for tool in tools:
        spec = {"name": tool.name, "description": tool.description or "", "parameters": tool.parameters or {}}
        lines.append(json.dumps(spec, ensure_ascii=False))
    example = syntax.calls_text([("<function name>", "<arguments as a JSON object>")])
    lines.append(f"To call a function, answer with only\n{example}")
    return "\n".join(lines)
