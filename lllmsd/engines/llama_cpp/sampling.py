"""The token loop: prompts into the context (context.py), the sampler chain, and each token's logprobs.

Choices made here, and why:
- KV reuse: before evaluating a prompt the decoder keeps the longest common prefix of what the context
  holds and the new prompt (all but the last prompt token, whose logits are needed to sample). That count
  is the ``cached_tokens`` reported in Usage: a follow-up chat turn evaluates only the new tokens.
- Logprobs come from the logits of the last evaluated position (``llama_get_logits_ith(ctx, -1)``), so
  ``logits_all`` (n_ctx x n_vocab floats) is never needed.
- Defaults for values a request leaves out: OpenAI's temperature 1 and top_p 1; llama.cpp's top_k 40 and
  min_p 0.05 (a small model at temperature 1 without any truncation rambles); no penalties. How many
  tokens a job may generate by default is the text engine's choice (text.py).
- Each choice samples from its own random stream, reproducible when the request gave a seed. llama.cpp's
  seed is 32-bit: a request's seed s (the API takes -2**63 to 2**63-1, as OpenAI) seeds choice i with
  (s + i) mod (2**32 - 1), 2**32 - 1 being llama.cpp's "draw a random seed".
- ``logit_bias`` -100 (OpenAI's "ban this token") is a bias of -10,000, not -inf. Whenever any other
  token may come, that is a ban all the same (float32's exp of -10,000 is exactly 0, greedy never picks
  it); but when a grammar (or json format, or tool calls) allows only banned tokens, they keep their
  order and generation goes on. With -inf every candidate was -inf, the sampler picked a token the
  grammar forbids, and llama.cpp aborted the process (SIGABRT) accepting it.
- ``top_k`` above the vocabulary is the vocabulary (the same candidates); llama.cpp takes an int32.
- A sampled token is evaluated only when the next one is asked for, so a stop leaves nothing unused in
  the context.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals

from lllmsd.core.jobs import Sampling, TokenLogprob, TopLogprob
from lllmsd.engines.llama_cpp.context import Context
from lllmsd.errors import InvalidRequest

DEFAULT_TOP_K = 40
DEFAULT_MIN_P = 0.05
DEFAULT_REPEAT_LAST_N = 64
RANDOM_SEED = llama_cpp.LLAMA_DEFAULT_SEED  # llama.cpp draws a random seed for this value
BAN_BIAS = -100.0  # OpenAI's "ban this token"
BAN_LOGIT = -10_000.0  # what a ban adds to the logit: finite, so a grammar always has a candidate


@dataclass(frozen=True, slots=True)
class Plan:
    """What one generation needs, resolved from a job."""

    sampling: Sampling
    max_tokens: int | None
    stops: tuple[str, ...] = ()
    grammar: str | None = None
    grammar_param: str = "grammar"  # the request parameter the grammar came from, for an error about it
    top_logprobs: int | None = None  # None: no logprobs
    text_offset: int = 0


@dataclass(slots=True)
class Outcome:
    """How one choice ended: ``finish`` None means cancelled; ``tool_trigger``: a tool call started in the
    text, which went before it (the call goes on under the grammar from there)."""

    cached: int
    tokens: int = 0
    finish: str | None = None
    logprob_sum: float = 0.0
    tool_trigger: str | None = None


def seed_for(sampling: Sampling, choice: int) -> int:
    """The seed of one choice's stream: random, or the request's seed offset by the choice index."""
    if sampling.seed is None:
        return RANDOM_SEED
    return (sampling.seed + choice) % RANDOM_SEED


class Decoder:
    """Evaluates prompts into one instance's context (context.py) and samples tokens after them.

    Per generated token the Python work is: one llama_decode (context.py), one ``llama_sampler_sample``
    (the whole chain runs in C), a dictionary lookup for the token's bytes and one for whether it ends
    the answer. Logits are read in Python only for logprobs."""

    def __init__(
        self, llama: llama_cpp.Llama, shown_markers: tuple[str, ...] = (), context: Context | None = None
    ) -> None:
        self._model = llama._model
        self._vocab = llama._model.vocab
        # the instance's own context, or one sequence of a context its slots share (slots.py)
        self._context = context if context is not None else Context(llama)
        self.context_size = self._context.size
        self.n_vocab = llama.n_vocab()
        # Control tokens that must come out as their text: markers a model family writes as one special
        # token ([TOOL_CALLS], <|python_tag|>, <think>), which the tool-call and reasoning parsers read.
        # Other control tokens stay invisible, as llama.cpp shows them.
        self._shown = frozenset(t for t in map(self._single_token, shown_markers) if t is not None)
        self._pieces: dict[int, bytes] = {}  # token -> its bytes, filled as tokens are met
        self._ends: dict[int, bool] = {}  # token -> whether it ends generation (llama_vocab_is_eog)

    @property
    def held_tokens(self) -> int:
        """How many tokens the context holds evaluated."""
        return self._context.held

    # ------------------------------------------------------------------------------------- KV cache

    def common_prefix(self, tokens: list[int]) -> int:
        """How many leading ``tokens`` the context already holds."""
        return self._context.common_prefix(tokens)

    def leave(self) -> None:
        """The job on this decoder ended (a sequence of a shared context stops taking part in rounds)."""
        self._context.leave()

    def evaluate(self, tokens: list[int], cancel: threading.Event | None, *, keep_last: bool = True) -> int | None:
        """Make the context hold ``tokens``, reusing the longest cached prefix; returns how many prompt
        tokens were reused, or None if cancelled. With ``keep_last`` the last token is always evaluated:
        sampling needs its logits."""
        context = self._context
        reuse = context.common_prefix(tokens)
        if keep_last:
            reuse = min(reuse, len(tokens) - 1)
        context.truncate(reuse)
        reuse = context.held  # 0 if the memory could not keep the prefix
        if not context.feed(tokens[reuse:], cancel):
            return None
        return reuse

    # ------------------------------------------------------------------------------------- sampling

    def tokens(
        self, prompt: list[int], plan: Plan, seed: int, cancel: threading.Event, outcome: Outcome, *, score: bool
    ) -> Iterator[tuple[bytes, TokenLogprob | None]]:
        """The generated tokens' bytes (and logprobs when asked for) after an evaluated ``prompt``; sets
        ``outcome.finish`` on a normal end. ``score`` sums logprobs into ``outcome`` even when the plan
        asks for none (best_of ranks candidates by them)."""
        chain = self._sampler(plan, seed, prompt)
        sampler = chain.sampler
        context = self._context
        out_of_time = plan.sampling.out_of_time
        want_logprobs = plan.top_logprobs is not None or score
        pieces, ends = self._pieces, self._ends
        budget = self._budget(plan, prompt)
        ahead = 0 if want_logprobs else budget  # the steps between two logits reads (context.py)
        try:
            token = -1
            for position in range(budget):
                if cancel.is_set():
                    return
                if out_of_time():
                    break  # the request's time budget is spent: it ends like max_tokens ("length")
                # the token sampled last is evaluated now (or was, ahead: next_sampled)
                token = (
                    context.next_sampled(token, sampler, ahead and budget - position - 1)
                    if position
                    else context.sample(sampler)
                )
                end = ends.get(token)
                if end is None:
                    end = ends[token] = bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))
                if end:
                    outcome.finish = "stop"
                    return
                piece = pieces.get(token)
                if piece is None:
                    piece = pieces[token] = self._piece(token)
                logprob = None
                if want_logprobs:
                    logprob = self._logprob(token, piece, plan.top_logprobs or 0)
                    outcome.logprob_sum += logprob.logprob
                outcome.tokens += 1
                yield piece, (logprob if plan.top_logprobs is not None else None)
            outcome.finish = "length"
        finally:
            context.settle()  # before the chain goes: a step evaluated ahead samples with it
            chain.close()

    def _piece(self, token: int) -> bytes:
        return self._model.detokenize([token], special=token in self._shown)

    def _single_token(self, text: str) -> int | None:
        """The token that ``text`` is, if it is one token of this model."""
        buffer = (llama_cpp.llama_token * 2)()
        data = text.encode("utf-8")
        count = llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, 2, False, True)
        return int(buffer[0]) if count == 1 else None

    def _budget(self, plan: Plan, prompt: list[int]) -> int:
        room = self.context_size - len(prompt)
        return room if plan.max_tokens is None else min(plan.max_tokens, room)

    def _sampler(self, plan: Plan, seed: int, prompt: list[int]) -> internals.LlamaSampler:
        s = plan.sampling
        chain = internals.LlamaSampler()
        if s.logit_bias:
            chain.add_logit_bias(self.n_vocab, self._logit_bias(s.logit_bias))
        self._add_penalties(chain, s, prompt)
        if plan.grammar is not None:
            self._add_grammar(chain, plan.grammar, plan.grammar_param)
        temperature = 1.0 if s.temperature is None else s.temperature
        if temperature <= 0:
            chain.add_greedy()
            return chain
        chain.add_top_k(DEFAULT_TOP_K if s.top_k is None else min(s.top_k, self.n_vocab))
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
        self.check_logit_bias(bias)
        return {int(t): (BAN_LOGIT if b <= BAN_BIAS else float(b)) for t, b in bias.items()}

    def check_logit_bias(self, bias: dict[int, float] | None) -> None:
        for token in bias or ():
            if not 0 <= int(token) < self.n_vocab:
                raise InvalidRequest(
                    f"logit_bias: token {token} is not in this model's vocabulary (0 to {self.n_vocab - 1})",
                    param="logit_bias",
                    code="invalid_value",
                )

    def check_grammar_tokens(self, tokens: list[str]) -> None:
        """Each ``<token>`` of a GBNF grammar is one token of this model, as llama.cpp requires."""
        buffer = (llama_cpp.llama_token * 2)()
        for token in tokens:
            data = token.encode("utf-8")
            count = llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, 2, False, True)
            if count != 1:
                raise InvalidRequest(
                    f"grammar: {token[:60]} is not one token of this model", param="grammar", code="invalid_value"
                )

    def _add_grammar(self, chain: internals.LlamaSampler, grammar: str, param: str) -> None:
        # Built here rather than with LlamaSampler.add_grammar: llama.cpp returns NULL for a grammar it
        # cannot parse, and adding NULL to a chain would crash the process.
        # Every grammar here was bounded first (gbnf.py, or the JSON Schema limits), so llama.cpp's parser
        # neither recurses too deep nor expands too much; one it still refuses is a 400.
        sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            raise InvalidRequest(f"{param}: llama.cpp could not use its grammar", param=param, code="invalid_value")
        llama_cpp.llama_sampler_chain_add(chain.sampler, sampler)

    def _logprob(self, token: int, piece: bytes, top: int) -> TokenLogprob:
        logits = self._context.logits(self.n_vocab)
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
