"""The llama-cpp engine: GGUF chat, completion and embedding models on llama-cpp-python.

One ``llama_cpp.Llama`` per instance. Two engine classes, one per model task, share how a GGUF is opened;
each module holds one concern and says in its docstring what it chose, and why:

- ``text.py``: ``LlamaCppTextEngine`` (chat, completions, preload): a job becomes a prompt and a plan;
  ``check_job`` and ``config_problems``.
- ``embedding.py``: ``LlamaCppEmbeddingEngine``: mean-pooled vectors, inputs packed into batches.
- ``model.py``: opening the GGUF as a ``Llama`` for an instance; the default context from its metadata.
- ``threads.py``: the default thread counts, when ``device`` leaves them out.
- ``prompt.py``: chat formats (the GGUF's Jinja template or a named llama-cpp-python format) and
  rendering messages, tool definitions and tool traffic into them (through the template when it takes
  tools).
- ``sampling.py``: the token loop: KV-cache reuse, the sampler chain, logprobs, seeds.
- ``generate.py``: choices, best_of candidates, reasoning and tool-call runs, as streams of events.
- ``grammar.py``: GBNF grammars from JSON Schemas, and the argument rules of tool definitions.
- ``tools/``: tool calls in each model family's own syntax: detection, grammar, parsing (docs/tools.md).
- ``reasoning.py``: a thinking model's ``<think>`` text split from its answer.

Threading: every method runs on the instance's worker thread (see engines/base.py); no locks here.
The modules import ``llama_cpp`` at the top, so the registry imports them only when a model needs them.
"""
