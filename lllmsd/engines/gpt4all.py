"""The gpt4all engine: GGUF chat models on the llama.cpp bundled with the gpt4all package (2.8.2), on CPU.

gpt4all's high-level ``GPT4All.chat_session`` keeps its own history, falls back to an Alpaca template for
sideloaded models and has no stop sequences, so this engine uses ``GPT4All`` only to find and load the file
(``allow_download=False``) and then drives the model through the package's C API (``llmodel_prompt``):

- Every prompt is evaluated as segments with the template ``"%1%2"`` and ``n_predict=0``: template text with
  special-token parsing on, message text with it off (a user cannot inject ``<|im_start|>``). Generation is
  a last call with an empty prompt, so the prompt callback sees exactly the prompt tokens and the response
  callback exactly the generated ones: both counts are the model's real token counts.
- The chat template comes from the config or from the GGUF's ``tokenizer.chat_template`` when it is a
  known format (ChatML, Llama 3); never gpt4all's Alpaca default.
- The session (the KV cache) survives between requests: a conversation that extends it by new messages
  evaluates only those. The end of the previous reply (its end-of-turn marker, and any text the cache does
  not hold as whole tokens after a cut at a stop sequence) is kept as pending segments and evaluated first.
- Stop sequences and cancellation live in the response callback: returning False stops generation at once.

Threading: ``llmodel_prompt`` blocks until generation ends and reports tokens through callbacks, so a
generation runs on a helper thread that feeds a queue the engine's iterator drains. The iterator joins the
helper before it returns or is closed, so the engine is still used by one call at a time.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from lllmsd.config import Gpt4AllModelConfig
from lllmsd.core.jobs import (
    ChatJob,
    ChatMessage,
    ChoiceEnd,
    CompletionJob,
    GenerationEvent,
    Job,
    Preload,
    Sampling,
    TextDelta,
    Usage,
)
from lllmsd.engines.base import ModelFiles, TextEngine
from lllmsd.engines.gpt4all_templates import (
    Segment,
    detect_format,
    format_from_config,
    read_gguf_info,
)
from lllmsd.engines.textstream import TextStream
from lllmsd.errors import ContextLengthExceeded, InvalidRequest, ModelUnavailable

log = logging.getLogger(__name__)

ENGINE = "gpt4all"
FALLBACK_CONTEXT = 2048  # when neither the config nor the GGUF gives a context length
PROMPT_BATCH = 128  # gpt4all clamps n_batch to 128 (LLMODEL_MAX_PROMPT_BATCH); its Python default of 8 is slow

# OpenAI's defaults, used when a request leaves a value out (gpt4all's own are top_p 0.4, repeat_penalty 1.18)
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = 0  # llama.cpp: k <= 0 keeps the whole vocabulary
DEFAULT_MIN_P = 0.0
DEFAULT_REPEAT_PENALTY = 1.0
DEFAULT_REPEAT_LAST_N = 64

# ------------------------------------------------------------------------------------------- the engine


@dataclass(slots=True)
class _Session:
    """What the KV cache holds: a chat transcript or a text prompt, plus segments not yet evaluated."""

    kind: str = "empty"  # empty | chat | text
    messages: tuple[ChatMessage, ...] = ()
    assistant_open: bool = False
    text: str = ""
    pending: list[Segment] = field(default_factory=list)


@dataclass(slots=True)
class _Generated:
    text: str
    tokens: int
    finish: str | None  # None when cancelled
    pending: list[Segment]  # emitted text the KV cache does not hold as whole tokens


@dataclass(slots=True)
class _CallState:
    """Written by the response callback (on the generating thread), read after the call returns."""

    cancelled: bool = False
    out_of_time: bool = False
    error: str | None = None


class _Cancelled(Exception):
    """The consumer went away during prompt evaluation."""


class _End:
    pass


@dataclass(frozen=True, slots=True)
class _Failed:
    exc: BaseException


_END = _End()


class Gpt4AllEngine(TextEngine):
    """Chat and completions with OpenAI's sampling basics (temperature, top_p, top_k, min_p, repeat
    penalty, stop, max_tokens) and none of the optional features: one choice, no seed, no logprobs."""

    name = ENGINE
    features = frozenset()

    def __init__(self, config: Gpt4AllModelConfig, files: ModelFiles) -> None:
        from gpt4all import GPT4All, _pyllmodel

        if files.path is None or not files.path.is_file():
            raise ModelUnavailable(f"gpt4all engine: a GGUF file is needed, got {files.path}")
        path = files.path.resolve()
        if path.suffix not in (".gguf", ".bin"):  # GPT4All appends ".gguf" to other names and misses the file
            raise ModelUnavailable(f"gpt4all engine: the model file must end in .gguf: {path}")
        super().__init__(config, files)
        info = read_gguf_info(path)
        self.format = format_from_config(
            config.prompt_template, config.system_template, detect_format(info.chat_template)
        )
        self.context_size = config.context_size or info.context_length or FALLBACK_CONTEXT
        self._lib = _pyllmodel.llmodel
        self._prompt_callback_type = _pyllmodel.PromptCallback
        self._response_callback_type = _pyllmodel.ResponseCallback
        # gpt4all prints (not logs) harmless "Failed to load libllamamodel-mainline-cuda" lines while it
        # looks for backends; device "cpu" (the default) keeps it off any GPU.
        log.debug("gpt4all: loading %s (n_ctx %d); libcudart errors on stderr are harmless", path, self.context_size)
        try:
            self._gpt = GPT4All(
                path.name,
                model_path=path.parent,
                allow_download=False,
                device=config.device.type,
                n_ctx=self.context_size,
                ngl=config.gpu_layers if config.device.type != "cpu" else 0,
                n_threads=None,
            )
        except ValueError as exc:  # "Unable to initialize model on GPU", an unknown device name
            if config.device.type == "cpu":
                raise
            raise ModelUnavailable(f"gpt4all cannot use device {config.device.type!r}: {exc}") from exc
        self._model = self._gpt.model
        if not self._lib.llmodel_isModelLoaded(self._model.model):  # GPT4All ignores a failed load
            self._gpt.close()
            raise ModelUnavailable(
                f"gpt4all engine: gpt4all's llama.cpp could not load {path.name} (pre-tokenizer "
                f"{info.pre_tokenizer!r}); it predates some architectures and pre-tokenizers, see docs/gpt4all.md"
            )
        if config.device.threads is not None:
            self._model.set_thread_count(config.device.threads)
        self._ctx = _pyllmodel.LLModelPromptContext(
            n_predict=0,
            top_k=DEFAULT_TOP_K,
            top_p=DEFAULT_TOP_P,
            min_p=DEFAULT_MIN_P,
            temp=DEFAULT_TEMPERATURE,
            n_batch=PROMPT_BATCH,
            repeat_penalty=DEFAULT_REPEAT_PENALTY,
            repeat_last_n=DEFAULT_REPEAT_LAST_N,
            context_erase=0.75,
        )
        self._session = _Session()
        log.info(
            "gpt4all: loaded %s, chat format %s, context %d, threads %d",
            path.name,
            self.format.name,
            self.context_size,
            self._model.thread_count(),
        )

    # ---------------------------------------------------------------------------------------- checks

    @classmethod
    def check_job(cls, config: Gpt4AllModelConfig, job: Job) -> None:
        # every optional feature (n, seed, logprobs, tools, grammar, ...) is undeclared, so admission
        # refuses it before this runs; what is left is what gpt4all's prompt API cannot take
        if isinstance(job, ChatJob):
            for message in job.messages:
                if message.role not in ("system", "user", "assistant"):
                    raise InvalidRequest(f"unknown message role {message.role!r}", param="messages")
            if not job.messages:
                raise InvalidRequest("messages must not be empty", param="messages")
        elif isinstance(job, CompletionJob) and not job.prompt:
            raise InvalidRequest("prompt must not be empty", param="prompt")

    def placement(self, _: object = None) -> dict[str, Any]:
        return {
            "backend": f"gpt4all ({self._gpt.backend})",
            "device": self._gpt.device or "cpu",
            "gpu_layers": self.config.gpu_layers if self.config.device.type != "cpu" else 0,
            "context_size": self.context_size,
        }

    def close(self) -> None:
        self._session = _Session()
        self._gpt.close()

    # ------------------------------------------------------------------------------------------ work

    def preload(self, preload: Preload) -> int:
        self._reset()
        if preload.messages:
            segments, assistant_open = self.format.render(preload.messages, False)
            self._evaluate(segments, lambda: False)
            self._session = _Session("chat", tuple(preload.messages), assistant_open)
        elif preload.prefix:
            self._evaluate([(preload.prefix, True)], lambda: False)
            self._session = _Session("text", text=preload.prefix)
        return int(self._ctx.n_past)

    def chat(self, job: ChatJob, cancel: threading.Event) -> Iterator[GenerationEvent]:
        return self._run(lambda emit, stop: self._chat(job, emit, stop), cancel)

    def complete(self, job: CompletionJob, cancel: threading.Event) -> Iterator[GenerationEvent]:
        return self._run(lambda emit, stop: self._complete(job, emit, stop), cancel)

    def _run(
        self, work: Callable[[Callable[[GenerationEvent], None], Callable[[], bool]], None], cancel: threading.Event
    ) -> Iterator[GenerationEvent]:
        """Run ``work`` on a helper thread (llmodel_prompt blocks and reports through callbacks) and yield
        what it emits, in lockstep: the helper waits after each event until the consumer asks for the next,
        so it never runs ahead, and a cancel set while the consumer handles an event stops generation
        before another token is produced. Closing the iterator early stops the generation and waits for it."""
        events: queue.SimpleQueue[GenerationEvent | _End | _Failed] = queue.SimpleQueue()
        resume = threading.Semaphore(0)  # released each time the consumer wants the next event
        left = threading.Event()  # the consumer closed this iterator

        def should_stop() -> bool:
            return cancel.is_set() or left.is_set()

        def emit(event: GenerationEvent) -> None:
            events.put(event)
            if not left.is_set():
                resume.acquire()

        def target() -> None:
            try:
                work(emit, should_stop)
            except _Cancelled:  # the consumer left during prompt evaluation: a quiet end, not an error
                events.put(_END)
            except BaseException as exc:
                events.put(_Failed(exc))
            else:
                events.put(_END)

        helper = threading.Thread(target=target, name="lllmsd-gpt4all-generate", daemon=True)
        helper.start()
        try:
            while True:
                item = events.get()
                if isinstance(item, _End):
                    return
                if isinstance(item, _Failed):
                    raise item.exc
                yield item
                resume.release()
        finally:
            left.set()
            resume.release()  # wakes a helper waiting in emit(); it sees `left` and stops
            helper.join()

    def _chat(self, job: ChatJob, emit: Callable[[GenerationEvent], None], should_stop: Callable[[], bool]) -> None:
        messages = job.messages
        session = self._session
        held = len(session.messages)
        if (
            session.kind == "chat"
            and len(messages) > held
            and all(a.identity() == b.identity() for a, b in zip(messages, session.messages, strict=False))
        ):
            new, segments, assistant_open = messages[held:], list(session.pending), session.assistant_open
        else:
            self._reset()
            new, segments, assistant_open = messages, [], False
        more, assistant_open = self.format.render(new, assistant_open)
        segments += more
        if not assistant_open:
            segments += self.format.open_assistant()
        cached, prompt_tokens = self._evaluate_prompt(segments, should_stop)
        done = self._generate(job.sampling, emit, should_stop, special=False)
        if done.finish is None:  # cancelled: keep the prompt, forget the partial reply
            self._ctx.n_past = prompt_tokens
            self._session = _Session("chat", messages, assistant_open=True)
            return
        reply = ChatMessage(role="assistant", content=done.text)
        self._session = _Session(
            "chat", (*messages, reply), False, pending=[*done.pending, (self.format.assistant_suffix, True)]
        )
        emit(ChoiceEnd(done.finish))
        emit(Usage(prompt_tokens, done.tokens, cached))

    def _complete(
        self, job: CompletionJob, emit: Callable[[GenerationEvent], None], should_stop: Callable[[], bool]
    ) -> None:
        session = self._session
        if session.kind == "text" and len(job.prompt) > len(session.text) and job.prompt.startswith(session.text):
            segments = [*session.pending, (job.prompt[len(session.text) :], True)]
        else:
            self._reset()
            segments = [(job.prompt, True)]
        cached, prompt_tokens = self._evaluate_prompt(segments, should_stop)
        done = self._generate(job.sampling, emit, should_stop, special=True)
        if done.finish is None:
            self._ctx.n_past = prompt_tokens
            self._session = _Session("text", text=job.prompt)
            return
        self._session = _Session("text", text=job.prompt + done.text, pending=done.pending)
        emit(ChoiceEnd(done.finish))
        emit(Usage(prompt_tokens, done.tokens, cached))

    # ------------------------------------------------------------------------------------ evaluation

    def _reset(self) -> None:
        self._session = _Session()
        self._ctx.n_past = 0  # llama.cpp drops the stale KV entries past n_past on the next evaluation

    def _evaluate_prompt(self, segments: list[Segment], should_stop: Callable[[], bool]) -> tuple[int, int]:
        """Evaluate a prompt's segments; return (tokens already cached, prompt tokens)."""
        cached = int(self._ctx.n_past)
        self._session = _Session()  # until the prompt is in, the cache matches no transcript
        try:
            self._evaluate(segments, should_stop)
        except BaseException:
            self._reset()
            raise
        return cached, int(self._ctx.n_past)

    def _evaluate(self, segments: Sequence[Segment], should_stop: Callable[[], bool]) -> None:
        for text, special in _merge(segments):
            self._evaluate_one(text, special, should_stop)

    def _evaluate_one(self, text: str, special: bool, should_stop: Callable[[], bool]) -> None:
        before = int(self._ctx.n_past)
        errors: list[str] = []

        def on_prompt(_token: int) -> bool:
            return not should_stop()

        def on_response(token: int, piece: bytes) -> bool:
            if token == -1:  # how gpt4all reports a refused prompt
                errors.append(piece.decode("utf-8", "replace"))
            return False

        self._prompt(text, special, 0, on_prompt, on_response)
        if should_stop():
            raise _Cancelled
        if int(self._ctx.n_past) == before:
            # gpt4all refuses a segment that does not fit and only prints why; a non-empty segment is at
            # least one token, so nothing evaluated means it did not fit. The real total is unknown (gpt4all
            # 2.8.2 exposes no tokenizer): report the smallest size that cannot fit.
            log.debug("gpt4all: segment not evaluated at n_past %d: %s", before, errors)
            raise ContextLengthExceeded(max(before + 1, self.context_size + 1), self.context_size)

    def _generate(
        self,
        sampling: Sampling,
        emit: Callable[[GenerationEvent], None],
        should_stop: Callable[[], bool],
        *,
        special: bool,
    ) -> _Generated:
        start = int(self._ctx.n_past)
        room = self.context_size - start
        limit = room if sampling.max_tokens is None else min(sampling.max_tokens, room)
        if limit <= 0:
            raise ContextLengthExceeded(start + 1, self.context_size)
        if sampling.strict_max_tokens and sampling.max_tokens is not None and sampling.max_tokens > room:
            # the client asked for more than fits beside the prompt: refuse, as OpenAI does
            raise ContextLengthExceeded(start + sampling.max_tokens, self.context_size, param="max_tokens")
        self._apply_sampling(sampling)
        stream = TextStream(sampling.stop)
        raw = bytearray()
        ends: list[int] = []  # byte offset where each generated token ends
        state = _CallState()

        def on_prompt(_token: int) -> bool:
            return not should_stop()

        def on_response(token: int, piece: bytes) -> bool:
            try:
                if token == -1:
                    state.error = piece.decode("utf-8", "replace")
                    return False
                raw.extend(piece)
                ends.append(len(raw))
                stream.feed(piece)
                text, _ = stream.release()
                if text:
                    emit(TextDelta(text))
                if stream.stopped:
                    return False
                if should_stop():
                    state.cancelled = True
                    return False
                if sampling.out_of_time():
                    state.out_of_time = True  # the request's time budget is spent: it ends as "length"
                    return False
            except BaseException as exc:  # an exception must not cross the C boundary
                state.error = f"{type(exc).__name__}: {exc}"
                return False
            return True

        self._prompt("", False, limit, on_prompt, on_response)
        if state.error is not None:  # the model's state is unknown now: a plain error gets the instance replaced
            raise RuntimeError(f"gpt4all: {state.error}")
        if state.cancelled:
            return _Generated(stream.emitted, len(ends), None, [])
        if not stream.stopped:
            tail, _ = stream.flush()
            if tail:
                emit(TextDelta(tail))
        held = int(self._ctx.n_past) - start  # tokens the library accepted (it may drop some it held back)
        kept, pending = _tokens_within(bytes(raw), ends[:held], stream.emitted)
        self._ctx.n_past = start + kept
        if stream.stopped:
            finish = "stop"
        elif state.out_of_time or len(ends) >= limit or int(self._ctx.n_past) + 1 >= self.context_size:
            finish = "length"  # max_tokens, or the context is full (gpt4all stops a token short of it)
        else:
            finish = "stop"
        return _Generated(stream.emitted, len(ends), finish, [(pending, special)] if pending else [])

    def _apply_sampling(self, sampling: Sampling) -> None:
        ctx = self._ctx
        ctx.temp = DEFAULT_TEMPERATURE if sampling.temperature is None else sampling.temperature
        ctx.top_p = DEFAULT_TOP_P if sampling.top_p is None else sampling.top_p
        ctx.top_k = DEFAULT_TOP_K if sampling.top_k is None else sampling.top_k
        ctx.min_p = DEFAULT_MIN_P if sampling.min_p is None else sampling.min_p
        ctx.repeat_penalty = DEFAULT_REPEAT_PENALTY if sampling.repeat_penalty is None else sampling.repeat_penalty
        ctx.repeat_last_n = DEFAULT_REPEAT_LAST_N if sampling.repeat_last_n is None else sampling.repeat_last_n

    def _prompt(
        self,
        text: str,
        special: bool,
        n_predict: int,
        on_prompt: Callable[[int], bool],
        on_response: Callable[[int, bytes], bool],
    ) -> None:
        """One llmodel_prompt call with the template "%1%2": ``text`` alone, no template around it, no
        end-of-turn text after the reply, and no context shift (a prompt that does not fit is refused)."""
        self._ctx.n_predict = n_predict
        self._ctx.n_batch = PROMPT_BATCH
        prompt_cb = self._prompt_callback_type(on_prompt)  # kept referenced for the whole call
        response_cb = self._response_callback_type(on_response)
        self._lib.llmodel_prompt(
            self._model.model,
            text.encode("utf-8"),
            b"%1%2",
            prompt_cb,
            response_cb,
            False,
            ctypes.byref(self._ctx),
            special,
            None,  # no fake reply
        )


def _merge(segments: Sequence[Segment]) -> list[Segment]:
    """Drop empty segments and join neighbours of the same kind: fewer calls, same tokens at most joints."""
    merged: list[Segment] = []
    for text, special in segments:
        if not text:
            continue
        if merged and merged[-1][1] == special:
            merged[-1] = (merged[-1][0] + text, special)
        else:
            merged.append((text, special))
    return merged


def _tokens_within(raw: bytes, ends: list[int], emitted: str) -> tuple[int, str]:
    """How many leading generated tokens lie wholly inside the emitted text, and the emitted text after them.

    After a stop sequence the cache holds tokens past the cut (and a token may straddle it); the cache is
    rewound to the tokens the reply really contains and the rest of the reply is evaluated as text later.
    """
    shown = emitted.encode("utf-8")
    common = 0
    for a, b in zip(raw, shown, strict=False):
        if a != b:
            break
        common += 1
    kept = sum(1 for end in ends if end <= common)
    while kept > 0:
        try:
            return kept, shown[ends[kept - 1] :].decode("utf-8")
        except UnicodeDecodeError:  # the boundary splits a character: give that token back too
            kept -= 1
    return 0, emitted
