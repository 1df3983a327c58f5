"""The llama-cpp engine: GGUF chat, completion and embedding models on llama-cpp-python.

One ``Llama`` object per instance. Generation is driven at the token level on a prompt this engine renders
itself (the GGUF's own Jinja chat template, or a named llama-cpp-python chat format), so one code path
controls everything OpenAI asks for: prefix reuse of the KV cache, stop sequences, cancellation between
tokens, logprobs, grammars and tool calls.

Choices made here, and why:
- KV reuse: before evaluating a prompt the engine keeps the longest common prefix of what the context
  holds and the new prompt (all but the last prompt token, whose logits are needed to sample). That count
  is the ``cached_tokens`` reported in Usage: a follow-up chat turn evaluates only the new tokens.
- Logprobs come from the logits of the last evaluated position (``llama_get_logits_ith(ctx, -1)``), so
  ``logits_all`` (n_ctx x n_vocab floats) is never needed.
- Structured output is constrained, never hoped for: json_object / json_schema and tool calls become GBNF
  grammars (llama-cpp-python's JSON-schema converter) that llama.cpp's grammar sampler enforces.
- Tool calls use one format for every model, described in the system prompt:
  ``<tool_call>\\n{"name": "...", "arguments": {...}}\\n</tool_call>``. ``required`` and a named function
  force it with a grammar from the first token; ``auto`` lets the model start freely and, if its answer
  starts with ``<tool_call>``, restarts the answer under the grammar (the prompt stays cached).
- Defaults for values a request leaves out: OpenAI's temperature 1 and top_p 1; llama.cpp's top_k 40 and
  min_p 0.05 (a small model at temperature 1 without any truncation rambles); no penalties; completions
  generate 16 tokens (OpenAI's default), chat until the model stops or the context is full.
- Threads: ``device.threads`` / ``device.batch_threads``; left out, each instance gets its share of the
  cores, ``cores // max_instances`` (at least 1), for prompt evaluation, and at most half the cores for
  generation (llama-cpp-python's own choice, the fastest measured on 2 cores: shared/MODELS.md). So one
  instance on 2 cores uses 1 and 2 threads; two instances sharing them use 1 and 1: ggml threads
  spin-wait, and two instances each asking for both cores slow each other down (bench/chat_throughput.py).
- Context: ``context_size`` or min(the model's training context, 4096) for text; for embeddings the whole
  context is one batch (pooling needs a sequence in one batch), so the default is smaller (2048).

Threading: every method runs on the instance's worker thread (see engines/base.py); no locks here.
"""

from __future__ import annotations

import codecs
import logging
import math
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals
from llama_cpp import llama_chat_format

from lllmsd.config import LlamaCppModelConfig
from lllmsd.core.tasks import (
    ChatMessage,
    ChatTask,
    ChoiceEnd,
    CompletionTask,
    EmbeddingResult,
    EmbeddingTask,
    GenerationEvent,
    ModelTask,
    Preload,
    Sampling,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
    ToolSpec,
    TopLogprob,
    Usage,
)
from lllmsd.engines.base import ModelFiles, Task
from lllmsd.engines.llama_grammar import (
    ENGINE,
    TOOL_OPEN,
    parse_tool_calls,
    resolve_grammar,
    response_grammar,
    tool_call_text,
    tool_grammar,
    tool_instructions,
)
from lllmsd.engines.textstream import TextStream
from lllmsd.errors import ContextLengthExceeded, InvalidRequest, UnsupportedParameter, UnsupportedTask

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 4096
DEFAULT_EMBEDDING_CONTEXT = 2048
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_TOP_K = 40
DEFAULT_MIN_P = 0.05
DEFAULT_REPEAT_LAST_N = 64
FALLBACK_CHAT_FORMAT = "chatml"
RANDOM_SEED = llama_cpp.LLAMA_DEFAULT_SEED  # llama.cpp draws a random seed for this value
POOLING_MEAN = llama_cpp.LLAMA_POOLING_TYPE_MEAN
POOLING_UNSPECIFIED = llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED
BAN_BIAS = -100.0  # OpenAI's "ban this token": made a hard ban (-inf), not merely unlikely

# --------------------------------------------------------------------------------------------- plans


@dataclass(frozen=True, slots=True)
class Plan:
    """What one generation needs, resolved from a task."""

    sampling: Sampling
    max_tokens: int | None
    stops: tuple[str, ...] = ()
    grammar: str | None = None
    top_logprobs: int | None = None  # None: no logprobs
    text_offset: int = 0


@dataclass(slots=True)
class Outcome:
    """How one choice ended: ``finish`` None means cancelled; ``tool_trigger`` asks for a tool-call rerun."""

    cached: int
    tokens: int = 0
    finish: str | None = None
    logprob_sum: float = 0.0
    tool_trigger: bool = False


@dataclass(slots=True)
class Candidate:
    """A best_of candidate, buffered until the best ones are known."""

    events: list[GenerationEvent] = field(default_factory=list)
    outcome: Outcome | None = None

    @property
    def score(self) -> float:
        if self.outcome is None or not self.outcome.tokens:
            return -math.inf
        return self.outcome.logprob_sum / self.outcome.tokens


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_batch_threads(max_instances: int, cores: int | None = None) -> int:
    """Prompt-evaluation threads of one instance: its share of the cores when instances run at once."""
    return max(1, (cores or usable_cores()) // max(1, max_instances))


def default_threads(max_instances: int, cores: int | None = None) -> int:
    """Generation threads of one instance: its share, and at most half the cores (token-by-token
    decoding is memory-bound; more threads mostly spin)."""
    cores = cores or usable_cores()
    return max(1, min(cores // 2, default_batch_threads(max_instances, cores)))


def seed_for(sampling: Sampling, choice: int) -> int:
    # Each choice gets its own stream, reproducible when the request gave a seed.
    if sampling.seed is None:
        return RANDOM_SEED
    return (sampling.seed + choice) % RANDOM_SEED


# -------------------------------------------------------------------------------------------- engine


class LlamaCppEngine:
    name = ENGINE

    def __init__(self, config: LlamaCppModelConfig, files: ModelFiles) -> None:
        if files.path is None:
            raise InvalidRequest("the llama-cpp engine needs a GGUF file")
        self.config = config
        self.path = str(files.path)
        self.embedding = config.task is ModelTask.EMBEDDING
        context = config.context_size or self._default_context()
        batch = context if self.embedding else min(config.batch_size, context)
        self._llama = llama_cpp.Llama(
            self.path,
            n_ctx=context,
            n_batch=batch,
            n_ubatch=batch,
            n_threads=config.device.threads or default_threads(config.max_instances),
            n_threads_batch=config.device.batch_threads or default_batch_threads(config.max_instances),
            embedding=self.embedding,
            pooling_type=POOLING_MEAN if self.embedding else POOLING_UNSPECIFIED,
            verbose=False,
        )
        self.context_size = self._llama.n_ctx()
        self.n_vocab = self._llama.n_vocab()
        self._vocab = self._llama._model.vocab
        self._formatter, self._formatter_open = self._chat_formatters()
        log.info("llama-cpp: loaded %s (context %d)", self.path, self.context_size)

    def _default_context(self) -> int:
        """min(training context, default), read from the GGUF metadata with a vocabulary-only load."""
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        model = internals.LlamaModel(path_model=self.path, params=params, verbose=False)
        try:
            metadata = model.metadata()
        finally:
            model.close()
        arch = metadata.get("general.architecture", "")
        trained = int(metadata.get(f"{arch}.context_length", 0) or 0)
        limit = DEFAULT_EMBEDDING_CONTEXT if self.embedding else DEFAULT_CONTEXT
        return min(trained, limit) if trained > 0 else limit

    def close(self) -> None:
        llama, self._llama = self._llama, None
        if llama is not None:
            llama.close()

    # ------------------------------------------------------------------------------------- checks

    @classmethod
    def check_task(cls, config: LlamaCppModelConfig, task: Task) -> None:
        if isinstance(task, ChatTask | CompletionTask) and config.task is ModelTask.EMBEDDING:
            raise UnsupportedTask("this model is configured for embedding, not text-completion")
        if isinstance(task, ChatTask):
            cls._check_chat(config, task)
        elif isinstance(task, CompletionTask):
            resolve_grammar(config, task.grammar)
            if task.echo and task.logprobs is not None:
                raise UnsupportedParameter("echo", ENGINE, "echo cannot be combined with logprobs (prompt logprobs)")
            if task.best_of is not None and task.best_of < task.n:
                raise InvalidRequest("best_of must be >= n", param="best_of")
        elif isinstance(task, EmbeddingTask):
            if config.task is not ModelTask.EMBEDDING:
                raise UnsupportedTask("this model is configured for text-completion, not embedding")
        else:
            raise UnsupportedTask(f"the llama-cpp engine cannot do {type(task).__name__}")

    @classmethod
    def _check_chat(cls, config: LlamaCppModelConfig, task: ChatTask) -> None:
        grammar = resolve_grammar(config, task.grammar)
        try:
            json_grammar = response_grammar(task)
            if task.tools and task.tool_choice != "none":
                tool_grammar(task.tools, task.parallel_tool_calls)
        except (ValueError, KeyError, TypeError, AssertionError) as exc:
            raise InvalidRequest(f"cannot turn the JSON Schema into a grammar: {exc}") from None
        if grammar is not None and json_grammar is not None:
            raise UnsupportedParameter("grammar", ENGINE, "give grammar or a JSON response_format, not both")
        if task.tools and task.tool_choice != "none" and (grammar is not None or json_grammar is not None):
            raise UnsupportedParameter(
                "tools", ENGINE, "tool calls cannot be combined with grammar or a JSON response_format"
            )

    # ------------------------------------------------------------------------------------ prompts

    def _chat_formatters(self) -> tuple[Callable[..., Any] | None, Callable[..., Any] | None]:
        """(formatter that opens the assistant turn, formatter that does not, if the format allows it)."""
        if self.embedding:
            return None, None
        name = self.config.chat_format
        metadata = self._llama.metadata
        key = "tokenizer.chat_template"
        if name is not None and name.startswith("chat_template.") and name != "chat_template.default":
            key = f"tokenizer.{name}"
        if (name is None or name.startswith("chat_template.")) and metadata.get(key):
            model = self._llama._model
            eos = model.token_get_text(model.token_eos()) if model.token_eos() >= 0 else ""
            bos = model.token_get_text(model.token_bos()) if model.token_bos() >= 0 else ""
            make = llama_chat_format.Jinja2ChatFormatter
            return (
                make(template=metadata[key], eos_token=eos, bos_token=bos, add_generation_prompt=True),
                make(template=metadata[key], eos_token=eos, bos_token=bos, add_generation_prompt=False),
            )
        if name is not None and name.startswith("chat_template."):
            raise InvalidRequest(f"chat_format {name!r}: the model has no such template", param="chat_format")
        return _registered_formatter(name or FALLBACK_CHAT_FORMAT), None

    def _render(
        self, messages: tuple[ChatMessage, ...], tools: tuple[ToolSpec, ...], *, open_turn: bool
    ) -> tuple[list[int], tuple[str, ...]]:
        """The prompt's tokens and the chat format's own stop strings."""
        formatter = self._formatter if open_turn or self._formatter_open is None else self._formatter_open
        assert formatter is not None
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
            raise InvalidRequest(f"the chat template rejected the messages: {exc}", param="messages") from None
        stops = rendered.stop if isinstance(rendered.stop, list) else [rendered.stop]
        tokens = self._tokenize(rendered.prompt, add_bos=not rendered.added_special)
        return tokens, tuple(s for s in stops if s)

    def _tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return self._llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def _check_context(self, prompt: list[int], param: str, sampling: Sampling | None = None) -> None:
        if len(prompt) >= self.context_size:  # at least one token must fit after the prompt
            raise ContextLengthExceeded(len(prompt), self.context_size, param=param)
        # a max_tokens the client asked for must fit beside the prompt (a default is shortened instead)
        if sampling is not None and sampling.strict_max_tokens and sampling.max_tokens is not None:
            needed = len(prompt) + sampling.max_tokens
            if needed > self.context_size:
                raise ContextLengthExceeded(needed, self.context_size, param="max_tokens")

    # ------------------------------------------------------------------------------ KV cache use

    def _cached_prefix(self, tokens: list[int]) -> int:
        llama = self._llama
        held = llama.input_ids[: min(llama.n_tokens, len(tokens))]
        differ = np.nonzero(held != np.asarray(tokens[: len(held)], dtype=held.dtype))[0]
        return int(differ[0]) if differ.size else len(held)

    def _evaluate(self, tokens: list[int], cancel: threading.Event | None, *, keep_last: bool = True) -> int | None:
        """Make the context hold ``tokens``, reusing the longest cached prefix; returns how many prompt
        tokens were reused, or None if cancelled. With ``keep_last`` the last token is always evaluated:
        sampling needs its logits."""
        llama = self._llama
        reuse = self._cached_prefix(tokens)
        if keep_last:
            reuse = min(reuse, len(tokens) - 1)
        if reuse < llama.n_tokens and not llama._ctx.kv_cache_seq_rm(-1, reuse, -1):
            reuse = 0  # this model's memory cannot drop a suffix: start over
            llama.reset()
        llama.n_tokens = reuse
        for start in range(reuse, len(tokens), llama.n_batch):
            if cancel is not None and cancel.is_set():
                return None
            llama.eval(tokens[start : start + llama.n_batch])
        return reuse

    def preload(self, preload: Preload) -> int:
        if preload.messages:
            tokens, _ = self._render(preload.messages, (), open_turn=False)
        else:
            tokens = self._tokenize(preload.prefix or "")
        if not tokens:
            return 0
        self._check_context(tokens, "preload")
        self._evaluate(tokens, None, keep_last=False)
        return int(self._llama.n_tokens)

    # --------------------------------------------------------------------------------- sampling

    def _sampler(self, plan: Plan, seed: int, prompt: list[int]) -> internals.LlamaSampler:
        s = plan.sampling
        chain = internals.LlamaSampler()
        if s.logit_bias:
            chain.add_logit_bias(self.n_vocab, self._logit_bias(s.logit_bias))
        self._add_penalties(chain, s, prompt)
        if plan.grammar is not None:
            self._add_grammar(chain, plan.grammar)
        temperature = 1.0 if s.temperature is None else s.temperature
        if temperature <= 0:
            chain.add_greedy()
            return chain
        chain.add_top_k(DEFAULT_TOP_K if s.top_k is None else s.top_k)
        chain.add_top_p(1.0 if s.top_p is None else s.top_p, 1)
        chain.add_min_p(DEFAULT_MIN_P if s.min_p is None else s.min_p, 1)
        chain.add_temp(temperature)
        chain.add_dist(seed)
        return chain

    def _add_penalties(self, chain: internals.LlamaSampler, s: Sampling, prompt: list[int]) -> None:
        repeat = s.repeat_penalty or 1.0
        if repeat == 1.0 and not s.frequency_penalty and not s.presence_penalty:
            return
        last_n = s.repeat_last_n if s.repeat_last_n is not None else DEFAULT_REPEAT_LAST_N
        sampler = llama_cpp.llama_sampler_init_penalties(
            self.n_vocab, last_n, repeat, s.frequency_penalty or 0.0, s.presence_penalty or 0.0
        )
        # "The text so far" includes the prompt (as in llama.cpp's server): the penalty window starts
        # filled with the prompt's last tokens. Fed to this sampler alone, never to a grammar.
        for token in prompt[-last_n:] if last_n > 0 else ():
            llama_cpp.llama_sampler_accept(sampler, token)
        llama_cpp.llama_sampler_chain_add(chain.sampler, sampler)

    def _logit_bias(self, bias: dict[int, float]) -> dict[int, float]:
        for token in bias:
            if not 0 <= int(token) < self.n_vocab:
                raise InvalidRequest(f"logit_bias: token {token} is not in the vocabulary", param="logit_bias")
        return {int(t): (-math.inf if b <= BAN_BIAS else float(b)) for t, b in bias.items()}

    def _add_grammar(self, chain: internals.LlamaSampler, grammar: str) -> None:
        # Built here rather than with LlamaSampler.add_grammar: llama.cpp returns NULL for a grammar it
        # cannot parse, and adding NULL to a chain would crash the process.
        sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            raise InvalidRequest("grammar: llama.cpp could not parse this GBNF grammar", param="grammar")
        llama_cpp.llama_sampler_chain_add(chain.sampler, sampler)

    def _logprob(self, token: int, piece: bytes, top: int) -> TokenLogprob:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._llama.ctx, -1), shape=(self.n_vocab,))
        peak = float(logits.max())
        log_total = peak + math.log(float(np.exp(logits - peak, dtype=np.float64).sum()))
        alternatives: tuple[TopLogprob, ...] = ()
        if top > 0:
            best = np.argpartition(logits, -top)[-top:]
            best = best[np.argsort(-logits[best])]
            alternatives = tuple(
                TopLogprob(
                    token=self._piece(int(t)).decode("utf-8", "replace"),
                    logprob=float(logits[t]) - log_total,
                    bytes=tuple(self._piece(int(t))),
                )
                for t in best
            )
        return TokenLogprob(
            token=piece.decode("utf-8", "replace"),
            logprob=float(logits[token]) - log_total,
            bytes=tuple(piece),
            top=alternatives,
        )

    def _piece(self, token: int) -> bytes:
        return self._llama._model.detokenize([token])

    def _is_end(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def _budget(self, plan: Plan, prompt: list[int]) -> int:
        room = self.context_size - len(prompt)
        return room if plan.max_tokens is None else min(plan.max_tokens, room)

    def _tokens(
        self, prompt: list[int], plan: Plan, seed: int, cancel: threading.Event, outcome: Outcome, *, score: bool
    ) -> Iterator[tuple[bytes, TokenLogprob | None]]:
        """The generated tokens' bytes (and logprobs when asked for); sets ``outcome.finish`` on a normal end."""
        sampler = self._sampler(plan, seed, prompt)
        try:
            token = -1
            for position in range(self._budget(plan, prompt)):
                if cancel.is_set():
                    return
                if position:
                    self._llama.eval([token])  # only now: a token nobody asks to continue stays unevaluated
                token = sampler.sample(self._llama._ctx, -1)
                if self._is_end(token):
                    outcome.finish = "stop"
                    return
                piece = self._piece(token)
                logprob = None
                if plan.top_logprobs is not None or score:
                    logprob = self._logprob(token, piece, plan.top_logprobs or 0)
                    outcome.logprob_sum += logprob.logprob
                outcome.tokens += 1
                yield piece, (logprob if plan.top_logprobs is not None else None)
            outcome.finish = "length"
        finally:
            sampler.close()

    # ------------------------------------------------------------------------------- generation

    def _run_text(
        self,
        prompt: list[int],
        plan: Plan,
        choice: int,
        cancel: threading.Event,
        *,
        watch_tools: bool = False,
        score: bool = False,
    ) -> Iterator[GenerationEvent]:
        """One text choice; returns its Outcome (as the generator's value)."""
        cached = self._evaluate(prompt, cancel)
        outcome = Outcome(cached=cached or 0)
        if cached is None:
            return outcome
        stream = TextStream(plan.stops, plan.text_offset)
        deciding = watch_tools  # tool_choice auto: hold the text until it cannot be a tool call
        for piece, logprob in self._tokens(prompt, plan, seed_for(plan.sampling, choice), cancel, outcome, score=score):
            stream.feed(piece, logprob)
            if deciding:
                head = stream.text.lstrip()
                if head.startswith(TOOL_OPEN):
                    outcome.tool_trigger = True
                    return outcome
                deciding = TOOL_OPEN.startswith(head)
            text, logprobs = stream.release(hold_all=deciding)
            if text or logprobs:
                yield TextDelta(text, choice=choice, logprobs=logprobs)
            if stream.stopped:
                outcome.finish = "stop"
                break
        if outcome.finish is not None:
            text, logprobs = stream.flush()
            if text or logprobs:
                yield TextDelta(text, choice=choice, logprobs=logprobs)
        return outcome

    def _run_tools(
        self, prompt: list[int], plan: Plan, choice: int, cancel: threading.Event
    ) -> Iterator[GenerationEvent]:
        """One choice constrained to tool calls, streamed as ToolCallDelta fragments."""
        cached = self._evaluate(prompt, cancel)
        outcome = Outcome(cached=cached or 0)
        if cached is None:
            return outcome
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        text = ""
        sent: list[int] = []  # characters of arguments sent, per call
        for piece, _ in self._tokens(prompt, plan, seed_for(plan.sampling, choice), cancel, outcome, score=False):
            text += decoder.decode(piece)
            for index, (name, arguments, _complete) in enumerate(parse_tool_calls(text)):
                if index == len(sent):
                    sent.append(len(arguments))
                    yield ToolCallDelta(index, arguments, id=f"call_{secrets.token_hex(12)}", name=name, choice=choice)
                elif len(arguments) > sent[index]:
                    yield ToolCallDelta(index, arguments[sent[index] :], choice=choice)
                    sent[index] = len(arguments)
        if outcome.finish == "stop":
            outcome.finish = "tool_calls"
        return outcome

    def _run_choice(
        self,
        prompt: list[int],
        plan: Plan,
        choice: int,
        cancel: threading.Event,
        tools: Plan | None,
        auto: bool,
        score: bool = False,
    ) -> Iterator[GenerationEvent]:
        if tools is not None and not auto:
            return (yield from self._run_tools(prompt, tools, choice, cancel))
        outcome = yield from self._run_text(prompt, plan, choice, cancel, watch_tools=auto, score=score)
        if outcome.tool_trigger and tools is not None:
            rerun = yield from self._run_tools(prompt, tools, choice, cancel)
            rerun.cached = outcome.cached
            return rerun
        return outcome

    def _generate(
        self,
        prompt: list[int],
        plan: Plan,
        n: int,
        cancel: threading.Event,
        *,
        tools: Plan | None = None,
        auto: bool = False,
        prefix: str | None = None,
    ) -> Iterator[GenerationEvent]:
        """``n`` choices one after the other (each reuses the evaluated prompt), then Usage."""
        cached: int | None = None
        completion = 0
        for choice in range(n):
            if prefix:
                yield TextDelta(prefix, choice=choice)
            outcome = yield from self._run_choice(prompt, plan, choice, cancel, tools, auto)
            cached = outcome.cached if cached is None else cached
            completion += outcome.tokens
            if outcome.finish is None:
                return  # cancelled: the consumer is gone
            yield ChoiceEnd(outcome.finish, choice=choice)
        yield Usage(len(prompt), completion, cached or 0)

    def _best_of(
        self, prompt: list[int], plan: Plan, n: int, best_of: int, cancel: threading.Event, prefix: str | None
    ) -> Iterator[GenerationEvent]:
        """Generate ``best_of`` candidates, keep the ``n`` with the highest mean token logprob."""
        candidates = []
        for index in range(best_of):
            candidate = Candidate()
            runner = self._run_choice(prompt, plan, index, cancel, None, False, score=True)
            candidate.outcome = _drain(runner, candidate.events)
            if candidate.outcome.finish is None:
                return
            candidates.append(candidate)
        ranked = sorted(candidates, key=lambda c: c.score, reverse=True)[:n]
        for choice, candidate in enumerate(ranked):
            if prefix:
                yield TextDelta(prefix, choice=choice)
            for event in candidate.events:
                yield replace(event, choice=choice)  # type: ignore[type-var]
            assert candidate.outcome is not None
            yield ChoiceEnd(candidate.outcome.finish or "stop", choice=choice)
        completion = sum(c.outcome.tokens for c in candidates if c.outcome is not None)
        cached = candidates[0].outcome.cached if candidates and candidates[0].outcome else 0
        yield Usage(len(prompt), completion, cached)

    # ------------------------------------------------------------------------------- entry points

    def chat(self, task: ChatTask, cancel: threading.Event) -> Iterator[GenerationEvent]:
        self._require_text()
        self._check_chat(self.config, task)
        use_tools = bool(task.tools) and task.tool_choice != "none"
        prompt, format_stops = self._render(task.messages, task.tools if use_tools else (), open_turn=True)
        self._check_context(prompt, "messages", task.sampling)
        grammar = resolve_grammar(self.config, task.grammar) or response_grammar(task)
        plan = Plan(
            sampling=task.sampling,
            max_tokens=task.sampling.max_tokens,
            stops=(*task.sampling.stop, *format_stops),
            grammar=grammar,
            top_logprobs=task.top_logprobs if task.logprobs else None,
        )
        tools = None
        if use_tools:
            chosen = task.tools
            if task.tool_choice not in (None, "auto", "required"):
                chosen = tuple(t for t in task.tools if t.name == task.tool_choice)
                if not chosen:
                    raise InvalidRequest(
                        f"tool_choice names an unknown function {task.tool_choice!r}", param="tool_choice"
                    )
            tools = replace(plan, stops=(), top_logprobs=None, grammar=tool_grammar(chosen, task.parallel_tool_calls))
        auto = use_tools and task.tool_choice in (None, "auto")
        yield from self._generate(prompt, plan, task.n, cancel, tools=tools, auto=auto)

    def complete(self, task: CompletionTask, cancel: threading.Event) -> Iterator[GenerationEvent]:
        self._require_text()
        self.check_task(self.config, task)
        prompt = self._completion_prompt(task)
        self._check_context(prompt, "prompt", task.sampling)
        plan = Plan(
            sampling=task.sampling,
            max_tokens=task.sampling.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS,
            stops=task.sampling.stop,
            grammar=resolve_grammar(self.config, task.grammar),
            top_logprobs=task.logprobs,
            text_offset=len(task.prompt) if task.echo else 0,
        )
        prefix = task.prompt if task.echo else None
        if task.best_of is not None and task.best_of > task.n:
            yield from self._best_of(prompt, plan, task.n, task.best_of, cancel, prefix)
        else:
            yield from self._generate(prompt, plan, task.n, cancel, prefix=prefix)

    def _completion_prompt(self, task: CompletionTask) -> list[int]:
        if task.suffix is None:
            return self._tokenize(task.prompt) or [self._fallback_start()]
        model = self._llama._model
        pre, suf, mid = model.token_prefix(), model.token_suffix(), model.token_middle()
        if min(pre, suf, mid) < 0:
            raise UnsupportedParameter("suffix", ENGINE, "this model has no fill-in-the-middle tokens")
        bos = [model.token_bos()] if model.add_bos_token() and model.token_bos() >= 0 else []
        before = self._tokenize(task.prompt, add_bos=False)
        after = self._tokenize(task.suffix, add_bos=False)
        return [*bos, pre, *before, suf, *after, mid]

    def _fallback_start(self) -> int:
        """An empty prompt still needs one token to sample from: BOS, or EOS for models without one."""
        model = self._llama._model
        return model.token_bos() if model.token_bos() >= 0 else model.token_eos()

    def _require_text(self) -> None:
        if self.embedding:
            raise UnsupportedTask("this model is configured for embedding, not text-completion")

    # ---------------------------------------------------------------------------------- embeddings

    def embed(self, task: EmbeddingTask) -> EmbeddingResult:
        if not self.embedding:
            raise UnsupportedTask("this model is configured for text-completion, not embedding")
        sequences = [self._embedding_tokens(item, index) for index, item in enumerate(task.inputs)]
        vectors: list[list[float]] = []
        for group in self._batches(sequences):
            vectors += self._embed_batch(group)
        if task.dimensions is not None:
            if task.dimensions > self._llama.n_embd():
                raise InvalidRequest(f"dimensions: the model has {self._llama.n_embd()} dimensions", param="dimensions")
            vectors = [_normalised(v[: task.dimensions]) for v in vectors]
        return EmbeddingResult(vectors=vectors, token_counts=[len(s) for s in sequences])

    def _embedding_tokens(self, item: str | tuple[int, ...], index: int) -> list[int]:
        tokens = self._tokenize(item) if isinstance(item, str) else [int(t) for t in item]
        if not tokens:
            raise InvalidRequest("input: empty inputs cannot be embedded", param="input")
        if any(not 0 <= t < self.n_vocab for t in tokens):
            raise InvalidRequest("input: a token id is not in the model's vocabulary", param="input")
        if len(tokens) > self.context_size:
            if self.config.truncate:  # a sequence is evaluated whole in one batch of context_size tokens
                return tokens[: self.context_size]
            raise InvalidRequest(
                f"input[{index}] is {len(tokens)} tokens, longer than the model's maximum of {self.context_size} "
                "tokens (truncate is off for this model)",
                param="input",
                code="context_length_exceeded",
            )
        return tokens

    def _batches(self, sequences: list[list[int]]) -> Iterator[list[list[int]]]:
        """Pack inputs into batches of at most n_batch tokens and n_seq_max sequences."""
        limit_tokens = self._llama.n_batch
        limit_seqs = self._llama.context_params.n_seq_max
        group: list[list[int]] = []
        size = 0
        for tokens in sequences:
            if group and (size + len(tokens) > limit_tokens or len(group) >= limit_seqs):
                yield group
                group, size = [], 0
            group.append(tokens)
            size += len(tokens)
        if group:
            yield group

    def _embed_batch(self, group: list[list[int]]) -> list[list[float]]:
        llama = self._llama
        batch = llama._batch
        batch.reset()
        for seq_id, tokens in enumerate(group):
            batch.add_sequence(tokens, seq_id, True)  # every token an output: pooling reads them all
        llama._ctx.kv_cache_clear()
        llama._ctx.decode(batch)
        n_embd = llama.n_embd()
        vectors = []
        for seq_id in range(len(group)):
            pointer = llama_cpp.llama_get_embeddings_seq(llama.ctx, seq_id)
            vectors.append(_normalised(np.ctypeslib.as_array(pointer, shape=(n_embd,)).astype(np.float64).tolist()))
        batch.reset()
        llama._ctx.kv_cache_clear()
        return vectors


# ------------------------------------------------------------------------------------------ helpers


def _drain(runner: Iterator[GenerationEvent], into: list[GenerationEvent]) -> Outcome:
    """Run a choice generator to its end, keeping its events; returns its Outcome."""
    while True:
        try:
            into.append(next(runner))
        except StopIteration as stop:
            return stop.value


def _normalised(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


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


def _registered_formatter(name: str) -> Callable[..., Any]:
    """The ChatFormatter behind one of llama-cpp-python's named chat formats."""
    try:
        handler = llama_chat_format.get_chat_completion_handler(name)
    except Exception:
        raise InvalidRequest(
            f"chat_format {name!r} is not a llama-cpp-python chat format", param="chat_format"
        ) from None
    # register_chat_format wraps a formatter in a handler closure; full handlers (function calling,
    # llava) drive generation themselves and cannot be used for rendering only.
    for cell in handler.__closure__ or ():
        value = cell.cell_contents
        if callable(value) and getattr(value, "__name__", "").startswith("format_"):
            return value
    raise InvalidRequest(f"chat_format {name!r} is a full chat handler, not a prompt format", param="chat_format")
