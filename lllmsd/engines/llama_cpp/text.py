"""The llama-cpp text engine: chat and completions on a GGUF, driven token by token.

Generation runs at the token level on a prompt this engine renders itself (prompt.py), so one code path
controls everything OpenAI asks for: prefix reuse of the KV cache, stop sequences, cancellation between
tokens, logprobs, grammars and tool calls (sampling.py, generate.py, grammar.py).

This module turns a job into a plan: the prompt's tokens, the sampling, the grammar, the stops. Choices
made here, and why:
- Completions generate 16 tokens when the request gives no max_tokens (OpenAI's default); chat runs until
  the model stops or the context is full.
- A prompt must leave room for at least one token, and a max_tokens the client asked for must fit beside
  the prompt (a 400, as with OpenAI); a default is shortened to the room left instead.
- An empty completion prompt still starts from BOS (or EOS for models without one): sampling needs a
  position to sample after.
- ``check_job`` compiles what the request brings (named grammars, JSON Schemas, tool schemas) before
  the request queues, so a schema the converter cannot express is a 400 at once, not after the wait;
  the grammars travel with the job (``compiled``), so each schema is converted once per request.
  That can take up to ~0.2 s for the largest schemas the API admits, so admission runs it off the event
  loop for jobs that carry schemas or grammars (``heavy_check`` says which, for this engine).
- ``repeat_last_n`` may be at most the context (the penalty sampler allocates that many slots): a 400
  naming it, before the request queues when the config fixes ``context_size``, else before generating.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace

from lllmsd.config import LlamaCppModelConfig
from lllmsd.core.jobs import (
    ChatJob,
    CompiledGrammars,
    CompletionJob,
    Feature,
    GenerationEvent,
    Job,
    Preload,
    Sampling,
    ToolSpec,
)
from lllmsd.engines.base import ModelFiles, TextEngine
from lllmsd.engines.llama_cpp.gbnf import gbnf_tokens
from lllmsd.engines.llama_cpp.generate import ChatText, ToolRun, best_of, generate
from lllmsd.engines.llama_cpp.grammar import (
    ENGINE,
    check_schema_parts,
    resolve_grammar,
    response_grammar,
    tool_argument_rules,
)
from lllmsd.engines.llama_cpp.model import load_llama, tokenize
from lllmsd.engines.llama_cpp.prompt import ChatPrompt, chat_format_problems
from lllmsd.engines.llama_cpp.resources import LlamaResources
from lllmsd.engines.llama_cpp.sampling import Plan
from lllmsd.engines.llama_cpp.slots import Slots
from lllmsd.engines.llama_cpp.tools.call_grammar import call_grammar
from lllmsd.errors import ContextLengthExceeded, InvalidRequest, UnsupportedParameter

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class LlamaCppTextEngine(LlamaResources, TextEngine):
    name = ENGINE
    features = frozenset(
        {
            Feature.N,
            Feature.BEST_OF,
            Feature.SEED,
            Feature.LOGPROBS,
            Feature.LOGIT_BIAS,
            Feature.PENALTIES,
            Feature.GRAMMAR,
            Feature.JSON_OUTPUT,
            Feature.TOOLS,
            Feature.ECHO,
            Feature.SUFFIX,
            Feature.TEMPLATE_KWARGS,
        }
    )

    def __init__(self, config: LlamaCppModelConfig, files: ModelFiles) -> None:
        super().__init__(config, files)
        self._llama, self._placement = load_llama(config, files, embedding=False)
        self._prompt = ChatPrompt(self._llama, config.chat_format, config.tool_format)
        self._slots = Slots(self._llama, config.slots, self._prompt.tools.shown_markers)
        self._decoder = self._slots.decoders[0]  # for what does not touch the context (vocabulary checks)
        self.context_size = self._decoder.context_size
        self.concurrency = config.slots  # calls the worker may run at once (each on a slot of its own)
        self._placement["slots"] = config.slots

    def close(self) -> None:
        llama, self._llama = self._llama, None
        self._slots.close()
        if llama is not None:
            llama.close()

    # ---------------------------------------------------------------------------------------- checks

    @classmethod
    def config_problems(cls, config: LlamaCppModelConfig) -> list[tuple[str, str]]:
        problems = [("chat_format", problem) for problem in chat_format_problems(config.chat_format)]
        for name in config.grammars:  # each within the bounds a request's grammar has (gbnf.py)
            try:
                resolve_grammar(config, name)
            except InvalidRequest as exc:
                problems.append(("grammars", f"{name}: {exc.message.removeprefix('grammar: ')}"))
        return problems

    @classmethod
    def check_job(cls, config: LlamaCppModelConfig, job: Job) -> Job | None:
        """The job with its grammars built (``compiled``), so that generation does not convert its schemas
        again; a 400 for what cannot be served."""
        if isinstance(job, ChatJob | CompletionJob) and config.context_size is not None:
            _check_repeat_last_n(job.sampling, config.context_size)
        if isinstance(job, ChatJob):
            return replace(job, compiled=cls._compile_chat(config, job))
        if isinstance(job, CompletionJob):
            if job.best_of is not None and job.best_of < job.n:
                raise InvalidRequest("best_of must be >= n", param="best_of", code="invalid_value")
            return replace(job, compiled=CompiledGrammars(resolve_grammar(config, job.grammar), "grammar"))
        return None

    @classmethod
    def heavy_check(cls, config: LlamaCppModelConfig, job: Job) -> bool:
        """Whether ``check_job`` converts a grammar, a JSON Schema or tool schemas for this job (up to ~0.2 s
        for the largest the API admits): such checks belong off the event loop."""
        if isinstance(job, ChatJob):
            fmt = job.response_format
            json_output = fmt is not None and fmt.type != "text"
            return job.grammar is not None or json_output or (bool(job.tools) and job.tool_choice != "none")
        return isinstance(job, CompletionJob) and job.grammar is not None

    @classmethod
    def _compile_chat(cls, config: LlamaCppModelConfig, job: ChatJob) -> CompiledGrammars:
        """The grammars of a chat job, each schema converted once: its answers' (grammar or response_format)
        and the argument rules of the tools ``tool_choice`` allows (the call syntax around them is the model
        family's, known once the model is loaded: tools/call_grammar.py)."""
        use_tools = bool(job.tools) and job.tool_choice != "none"
        if job.grammar is not None and job.response_format is not None and job.response_format.type != "text":
            raise UnsupportedParameter("grammar", ENGINE, "give grammar or a JSON response_format, not both")
        output, param = resolve_grammar(config, job.grammar), "grammar"
        if output is None:
            output, param = response_grammar(job), "response_format"  # a schema it cannot convert: a 400 naming it
        if use_tools and output is not None:
            raise UnsupportedParameter(
                "tools", ENGINE, "tool calls cannot be combined with grammar or a JSON response_format"
            )
        arguments = None
        if use_tools:
            chosen = _chosen_tools(job)
            for index, tool in enumerate(job.tools):  # every tool's schema, named by its place in the request
                if tool not in chosen:
                    check_schema_parts(tool.parameters or {}, f"tools[{index}].function.parameters")
            rules, text = tool_argument_rules(chosen)
            arguments = (tuple(rules), text)
        return CompiledGrammars(
            output=output, output_param=param if output is not None else None, tool_arguments=arguments
        )

    def _check_loaded(self, sampling: Sampling, grammar: str | None) -> None:
        """What only the loaded model can judge, before any prompt is evaluated."""
        _check_repeat_last_n(sampling, self.context_size)
        self._decoder.check_logit_bias(sampling.logit_bias)
        text = self.config.grammars.get(grammar, grammar) if grammar is not None else None
        if text is not None and not text.lstrip().startswith("{"):  # GBNF, not a JSON Schema
            self._decoder.check_grammar_tokens(gbnf_tokens(text))

    def _check_context(self, prompt: list[int], param: str, sampling: Sampling | None = None) -> None:
        if len(prompt) >= self.context_size:  # at least one token must fit after the prompt
            raise ContextLengthExceeded(len(prompt), self.context_size, param=param)
        # a max_tokens the client asked for must fit beside the prompt (a default is shortened instead)
        if sampling is not None and sampling.strict_max_tokens and sampling.max_tokens is not None:
            needed = len(prompt) + sampling.max_tokens
            if needed > self.context_size:
                raise ContextLengthExceeded(needed, self.context_size, param="max_tokens")

    # ----------------------------------------------------------------------------------- entry points

    def preload(self, preload: Preload) -> int:
        if preload.messages:
            tokens = self._prompt.render(preload.messages, (), open_turn=False).tokens
        else:
            tokens = tokenize(self._llama, preload.prefix or "")
        if not tokens:
            return 0
        self._check_context(tokens, "preload")
        with self._slots.take(tokens) as decoder:
            decoder.evaluate(tokens, None, keep_last=False)
            return decoder.held_tokens

    def chat(self, job: ChatJob, cancel: threading.Event) -> Iterator[GenerationEvent]:
        # built at admission (check_job); built here for callers that bypass it: the plan assumes it
        compiled = job.compiled or self._compile_chat(self.config, job)
        self._check_loaded(job.sampling, job.grammar)
        use_tools = compiled.tool_arguments is not None
        rendered = self._prompt.render(
            job.messages,
            job.tools if use_tools else (),
            open_turn=True,
            template_kwargs=job.template_kwargs,
            reasoning_effort=job.reasoning_effort,
        )
        prompt = rendered.tokens
        self._check_context(prompt, "messages", job.sampling)
        plan = Plan(
            sampling=job.sampling,
            max_tokens=job.sampling.max_tokens,
            stops=(*job.sampling.stop, *rendered.stops),
            grammar=compiled.output,
            grammar_param=compiled.output_param or "grammar",
            top_logprobs=job.top_logprobs if job.logprobs else None,
        )
        tools = self._tool_run(job, plan, compiled) if use_tools else None
        chat = ChatText(
            split_reasoning=self._prompt.tools.thinks and self.config.reasoning == "separate",
            thinking=rendered.thinking,
            tokenize=lambda text: tokenize(self._llama, text, add_bos=False),
        )
        with self._slots.take(prompt) as decoder:
            yield from generate(decoder, prompt, plan, job.n, cancel, tools=tools, chat=chat)

    def _tool_run(self, job: ChatJob, plan: Plan, compiled: CompiledGrammars) -> ToolRun:
        chosen = _chosen_tools(job)
        syntax = self._prompt.tools.syntax
        arguments = compiled.tool_arguments
        grammar = call_grammar(chosen, syntax, job.parallel_tool_calls, (list(arguments[0]), arguments[1]))
        return ToolRun(
            plan=replace(plan, stops=(), top_logprobs=None, grammar=grammar, grammar_param="tools"),
            syntax=syntax,
            names=frozenset(t.name for t in chosen),
            parallel=job.parallel_tool_calls,
            live=job.stream,
            forced=job.tool_choice not in (None, "auto"),
        )

    def complete(self, job: CompletionJob, cancel: threading.Event) -> Iterator[GenerationEvent]:
        if job.compiled is None:  # a caller that bypassed admission
            job = self.check_job(self.config, job) or job
        self._check_loaded(job.sampling, job.grammar)
        prompt = self._completion_prompt(job)
        self._check_context(prompt, "prompt", job.sampling)
        plan = Plan(
            sampling=job.sampling,
            max_tokens=job.sampling.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS,
            stops=job.sampling.stop,
            grammar=job.compiled.output if job.compiled else None,
            top_logprobs=job.logprobs,
            text_offset=len(job.prompt) if job.echo else 0,
        )
        prefix = job.prompt if job.echo else None
        with self._slots.take(prompt) as decoder:
            if job.best_of is not None and job.best_of > job.n:
                yield from best_of(decoder, prompt, plan, job.n, job.best_of, cancel, prefix)
            else:
                yield from generate(decoder, prompt, plan, job.n, cancel, prefix=prefix)

    def _completion_prompt(self, job: CompletionJob) -> list[int]:
        if job.suffix is None:
            return tokenize(self._llama, job.prompt) or [self._fallback_start()]
        model = self._llama._model
        pre, suf, mid = model.token_prefix(), model.token_suffix(), model.token_middle()
        if min(pre, suf, mid) < 0:
            raise UnsupportedParameter("suffix", ENGINE, "this model has no fill-in-the-middle tokens")
        bos = [model.token_bos()] if model.add_bos_token() and model.token_bos() >= 0 else []
        before = tokenize(self._llama, job.prompt, add_bos=False)
        after = tokenize(self._llama, job.suffix, add_bos=False)
        return [*bos, pre, *before, suf, *after, mid]

    def _fallback_start(self) -> int:
        """An empty prompt still needs one token to sample from: BOS, or EOS for models without one."""
        model = self._llama._model
        return model.token_bos() if model.token_bos() >= 0 else model.token_eos()


def _chosen_tools(job: ChatJob) -> tuple[ToolSpec, ...]:
    """The tools a call may use: all, or the one ``tool_choice`` names."""
    if job.tool_choice in (None, "auto", "required", "none"):
        return job.tools
    chosen = tuple(t for t in job.tools if t.name == job.tool_choice)
    if not chosen:
        raise InvalidRequest(
            f"tool_choice names an unknown function {job.tool_choice!r}", param="tool_choice", code="invalid_value"
        )
    return chosen


def _check_repeat_last_n(sampling: Sampling, context_size: int) -> None:
    if sampling.repeat_last_n is not None and sampling.repeat_last_n > context_size:
        raise InvalidRequest(
            f"repeat_last_n is {sampling.repeat_last_n}, more than this model's context of {context_size} tokens",
            param="repeat_last_n",
            code="invalid_value",
        )
