"""Tool calls in each model family's own format: detection, grammar, parsing, and the calls of one answer.

- ``syntax.py``: ``CallSyntax``, one value per family (Hermes/Qwen, Llama 3.x, Mistral, generic).
- ``formats.py``: which family a chat template belongs to, whether it renders tools itself, whether the
  model thinks; the instructions for templates that know nothing of tools.
- ``call_grammar.py``: the GBNF that constrains calls to the family's syntax and the tools' schemas.
- ``parse.py``: reading calls back out of text cut off anywhere.
- ``trigger.py``: finding where a call starts in free text (tool_choice ``auto``).
- ``calls.py``: one answer's calls as they stream: repeats, truncation, finish reasons.

All of it is pure logic on text; generate.py and prompt.py use it with the model.
"""
