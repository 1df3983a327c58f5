"""The call syntaxes of the model families: how a family writes one or several tool calls.

Every family here writes a call as a JSON object ``{"name": "<function>", "<key>": {<arguments>}}``;
what differs is what surrounds the objects (tags, a list, a marker token), the key of the arguments and
what separates several calls. One ``CallSyntax`` value per family says all of that, and the grammar
(grammar.py) and the parser (parse.py) are both built from it, so what the engine forces a model to
write and what it reads back cannot drift apart.

Sources (each family's published chat template and model card):
- Hermes 2 Pro / Qwen 2.5 / Qwen 3: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``,
  one block per call, blocks separated by a newline; text may come before the first block.
- Llama 3.1 / 3.2 / 3.3 (JSON tool calling): the answer is ``{"name": ..., "parameters": {...}}``,
  optionally after ``<|python_tag|>``; only at the start of the answer.
- Mistral / Ministral (v3 tokenizer templates): ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``.
- generic: the Hermes syntax, taught by instructions in the system prompt when the model's template knows
  nothing of tools.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CallSyntax:
    """How one family writes tool calls. ``open`` / ``close`` surround all the calls, ``call_open`` /
    ``call_close`` each call object, ``separator`` goes between two calls."""

    family: str
    call_open: str
    call_close: str
    args_key: str = "arguments"
    separator: str = "\n"
    open: str = ""
    close: str = ""
    # What starts the calls in free text (tool_choice auto); ``anywhere``: after some text too, not only
    # at the start of the answer.
    triggers: tuple[str, ...] = ()
    anywhere: bool = True
    # Marker the family may write before its calls, which carries nothing (Llama's <|python_tag|>).
    optional_prefix: str = ""
    # Marker texts that real models of the family emit as special (control) tokens, which must be shown
    # as text to be recognised.
    special_markers: tuple[str, ...] = ()

    def call_text(self, name: str, arguments: str) -> str:
        """One call as this family writes it (arguments: JSON text)."""
        return f'{self.call_open}{{"name": "{name}", "{self.args_key}": {arguments}}}{self.call_close}'

    def calls_text(self, calls: list[tuple[str, str]]) -> str:
        """Several calls, as one answer of this family."""
        return self.open + self.separator.join(self.call_text(n, a) for n, a in calls) + self.close


HERMES = CallSyntax(
    family="hermes",
    call_open="<tool_call>\n",
    call_close="\n</tool_call>",
    triggers=("<tool_call>",),
)
LLAMA3 = CallSyntax(
    family="llama3",
    call_open="",
    call_close="",
    args_key="parameters",
    separator="\n",
    triggers=('{"name"', "<|python_tag|>"),
    anywhere=False,
    optional_prefix="<|python_tag|>",
    special_markers=("<|python_tag|>",),
)
MISTRAL = CallSyntax(
    family="mistral",
    call_open="",
    call_close="",
    separator=", ",
    open="[TOOL_CALLS][",
    close="]",
    triggers=("[TOOL_CALLS]",),
    special_markers=("[TOOL_CALLS]",),
)
GENERIC = CallSyntax(
    family="generic", call_open=HERMES.call_open, call_close=HERMES.call_close, triggers=HERMES.triggers
)

SYNTAXES: dict[str, CallSyntax] = {s.family: s for s in (HERMES, LLAMA3, MISTRAL, GENERIC)}
