"""Chat speed on SmolLM2: lllmsd against llama.cpp's own llama-server and llama-cpp-python in-process.

1. Single client, same prompt, ``--max-tokens`` tokens at temperature 0, same threads everywhere
   (``--threads`` for generation and prompt evaluation), non-stream and stream:
     (a) llama-cpp-python in-process: ``Llama.create_chat_completion`` (flash attention on, as in (b), (c))
     (b) llama-server over HTTP: built from the llama.cpp tree llama-cpp-python 0.3.36 vendors
         (``make llama-server``, cached under .cache/), same model, threads and context
     (c) ``lllmsd serve`` over HTTP, llama-cpp engine, one instance
     (bound) llama.cpp alone on a model of its own: one ``llama_decode`` and greedy sampling in C per
         token, the prompt evaluated untimed (BareDecode): what the machine allows at that moment
     (d) lllmsd's llama-cpp engine object in-process (EngineInProcess): (c) without worker and HTTP
   Completion tokens per second of wall time per request (the repeated prompt is cached by all three),
   median of ``--runs`` after one warm-up each; the contenders take turns so drifting load hits all
   alike. Targets: lllmsd/(a) >= 1.0 and lllmsd/(b) >= 1.0, non-stream and stream.
2. Second-turn time to first token: the follow-up turn after a first answer, on lllmsd's instance that
   holds the conversation (warm), on a second model id on the same file whose instance holds an
   unrelated conversation (cold), and on llama-server (its slot keeps the conversation's prompt cache).
3. ``--clients`` concurrent streaming clients (4, then 8), each with its own prompt: aggregate tokens/s
   and p50 time to first token of lllmsd with four 1-thread instances of the model against llama-server
   with as many parallel slots as clients (``-np``, ``--threads`` threads, continuous batching).
   Target for 4 streams: aggregate >= 1.2x llama-server's. Beside them, the bound: bare ``llama_decode``
   rounds of as many sequences in-process (what llama.cpp itself does with no server around it).
4. gpt4all on the same SmolLM2 (its metadata rewritten for gpt4all's older llama.cpp): the gpt4all package
   in-process (``GPT4All.chat_session`` with the ChatML template, ``generate``) vs lllmsd's gpt4all engine
   over HTTP, same prompt, tokens, threads and greedy sampling, non-stream and stream. Ratio lllmsd/(a)
   (target >= 0.95). ``--no-gpt4all`` skips it.

Run: make llama-server && .venv/bin/python bench/chat_throughput.py [--runs 3] [--max-tokens 64]
[--threads 2] [--bursts 3]. ggml threads spin-wait, so other load on the machine changes the figures a lot:
compare within one run (the load average is printed with each part).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from pool_overhead import Daemon, free_port  # bench/ is the script's folder: its sibling module

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.setup_models import model_path  # noqa: E402 - needs the repository on sys.path

STORY = "Write a long story about a dragon who lives in a castle by the sea."
MESSAGES = [{"role": "user", "content": STORY}]
FOLLOW_UP = "Now tell the same story from the point of view of the sea, in a few sentences."
UNRELATED = [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Hi"}]
CHATML_USER = "<|im_start|>user\n{0}<|im_end|>\n<|im_start|>assistant\n"  # SmolLM2's turn format
TOPICS = ["a dragon in a castle by the sea", "a robot learning to paint", "a lighthouse keeper's cat",
          "a city under the ice", "a baker who can fly", "a map that redraws itself"]  # fmt: skip
CONTEXT = 4096
TURN_TWO_TOKENS = 8  # only the first token's time matters for the follow-up turn
SERVER_START_SECONDS = 60
LLAMA_SERVER = ROOT / ".cache" / "llama-server" / "llama-server"  # `make llama-server`
POOL_INSTANCES = 4  # lllmsd's layout for concurrent streams: four 1-thread instances
BOUND_REPEATS = 5  # answers per sequence count for the bare-decode bound (2-4 s each on 2 cores)


@dataclass(frozen=True)
class Sample:
    tokens: int
    seconds: float
    ttft: float | None = None
    text: str | None = ""  # None: no text (the bound samples tokens but does not detokenize them)
    cached: int | None = None  # prompt tokens the backend reported as cached (lllmsd only)

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


Call = Callable[[bool], Awaitable[Sample]]  # stream? -> one measured request


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ------------------------------------------------------------------------------------------ clients


def body(model: str, messages: list[dict[str, str]], max_tokens: int, stream: bool, usage: bool) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens,
        "repeat_penalty": 1.0,  # no penalty anywhere (OpenAI and lllmsd have none by default)
        "stream": stream,
    }  # fmt: skip
    if stream and usage:
        payload["stream_options"] = {"include_usage": True}
    return payload


async def post_chat(session: aiohttp.ClientSession, url: str, payload: dict[str, Any]) -> Sample:
    """One chat request; streaming: time to the first content delta, tokens from usage or deltas."""
    start = time.perf_counter()
    async with session.post(f"{url}/v1/chat/completions", json=payload) as response:
        if not payload["stream"]:
            answer = await response.json()
            assert response.status == 200, answer
            usage = answer["usage"]
            return Sample(usage["completion_tokens"], time.perf_counter() - start,
                          text=answer["choices"][0]["message"]["content"], cached=cached_of(usage))  # fmt: skip
        assert response.status == 200, await response.text()
        ttft, parts, usage = None, [], None
        async for raw in response.content:  # one SSE line at a time
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            assert "error" not in chunk, chunk
            for choice in chunk.get("choices") or ():
                if choice.get("delta", {}).get("content"):
                    ttft = ttft or time.perf_counter() - start
                    parts.append(choice["delta"]["content"])
            usage = chunk.get("usage") or usage
    tokens = usage["completion_tokens"] if usage else len(parts)
    return Sample(tokens, time.perf_counter() - start, ttft, "".join(parts), cached_of(usage))


def cached_of(usage: dict[str, Any] | None) -> int | None:
    details = (usage or {}).get("prompt_tokens_details") or {}
    return details.get("cached_tokens")


def http_call(session: aiohttp.ClientSession, url: str, model: str, max_tokens: int, usage: bool) -> Call:
    async def call(stream: bool) -> Sample:
        return await post_chat(session, url, body(model, MESSAGES, max_tokens, stream, usage))

    return call


def in_process_call(llama: Any, max_tokens: int, thread: Executor) -> Call:
    def run(stream: bool) -> Sample:
        start = time.perf_counter()
        kwargs: dict[str, Any] = {"temperature": 0, "max_tokens": max_tokens, "repeat_penalty": 1.0}
        if not stream:
            answer = llama.create_chat_completion(MESSAGES, **kwargs)
            return Sample(answer["usage"]["completion_tokens"], time.perf_counter() - start,
                          text=answer["choices"][0]["message"]["content"])  # fmt: skip
        ttft, parts = None, []
        for chunk in llama.create_chat_completion(MESSAGES, stream=True, **kwargs):
            if content := chunk["choices"][0]["delta"].get("content"):
                ttft = ttft or time.perf_counter() - start
                parts.append(content)
        # One chunk per token (llama-cpp-python merges only bytes of one character); checked against
        # the non-stream token count in the table.
        return Sample(len(parts), time.perf_counter() - start, ttft, "".join(parts))

    async def call(stream: bool) -> Sample:
        return await asyncio.get_running_loop().run_in_executor(thread, run, stream)

    return call


def decode_steps(llama: Any, batch: Any, steps: list[tuple[int, list[int], int]]) -> None:
    """One ``llama_decode`` of ``steps`` (sequence, tokens, first position) in ``batch``, logits for each
    step's last token: the bare loop both bounds time."""
    import llama_cpp

    batch.n_tokens = 0
    for seq, step_tokens, position in steps:
        for offset, token in enumerate(step_tokens):
            i = batch.n_tokens
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position + offset, 1
            batch.seq_id[i][0], batch.logits[i] = seq, offset == len(step_tokens) - 1
            batch.n_tokens += 1
    if llama_cpp.llama_decode(llama.ctx, batch) != 0:
        raise RuntimeError("llama_decode failed")


class BareDecode:
    """The bound of part 1: llama.cpp alone on a model of its own, in-process, with the same threads. The
    chat prompt is evaluated untimed (every contender has it cached); then each token is one
    ``llama_decode`` and greedy sampling in C, with no server, no Python loop around a sampler, no
    detokenizing. Measured in turn with the contenders, it is what the machine allows at that moment."""

    def __init__(self, threads: int, max_tokens: int, thread: Executor) -> None:
        import llama_cpp

        self.llama_cpp, self.max_tokens, self.thread = llama_cpp, max_tokens, thread
        self.llama = load_in_process(threads)
        self.prompt = self.llama.tokenize(CHATML_USER.format(STORY).encode(), special=True)
        self.batch = llama_cpp.llama_batch_init(len(self.prompt), 0, 1)
        self.sampler = llama_cpp.llama_sampler_init_greedy()

    def _run(self) -> Sample:
        lib, ctx = self.llama_cpp, self.llama.ctx
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        decode_steps(self.llama, self.batch, [(0, self.prompt, 0)])
        started = time.perf_counter()
        for position in range(len(self.prompt), len(self.prompt) + self.max_tokens):
            decode_steps(self.llama, self.batch, [(0, [lib.llama_sampler_sample(self.sampler, ctx, -1)], position)])
        seconds = time.perf_counter() - started
        return Sample(self.max_tokens, seconds, text=None)

    async def __call__(self, stream: bool) -> Sample:  # streaming makes no difference to llama.cpp alone
        return await asyncio.get_running_loop().run_in_executor(self.thread, self._run)

    def close(self) -> None:
        self.llama_cpp.llama_sampler_free(self.sampler)
        self.llama_cpp.llama_batch_free(self.batch)
        self.llama.close()


class EngineInProcess:
    """lllmsd's llama-cpp engine object in this process, as its worker runs it, with no worker, no daemon
    and no HTTP: the row that shows what those cost, and how close the engine's own loop comes to the
    bound. Same model config as (c)."""

    def __init__(self, threads: int, max_tokens: int, thread: Executor) -> None:
        from lllmsd.config import parse_config
        from lllmsd.core.jobs import ChatJob, ChatMessage, Sampling
        from lllmsd.engines.base import ModelFiles
        from lllmsd.engines.llama_cpp.text import LlamaCppTextEngine

        config = parse_config({"models": {"chat": lllmsd_models(threads)["chat"]}}).models["chat"]
        self.engine = LlamaCppTextEngine(config, ModelFiles(Path(config.location)))
        sampling = Sampling(max_tokens=max_tokens, temperature=0, repeat_penalty=1.0)
        messages = tuple(ChatMessage(m["role"], m["content"]) for m in MESSAGES)
        self.jobs = {stream: ChatJob(messages, sampling, stream=stream) for stream in (False, True)}
        self.thread = thread

    def _run(self, stream: bool) -> Sample:
        from lllmsd.core.jobs import TextDelta, Usage

        start, ttft, parts, tokens = time.perf_counter(), None, [], 0
        for event in self.engine.chat(self.jobs[stream], threading.Event()):
            if isinstance(event, TextDelta) and event.text:
                ttft = ttft or time.perf_counter() - start
                parts.append(event.text)
            elif isinstance(event, Usage):
                tokens = event.completion_tokens
        return Sample(tokens, time.perf_counter() - start, ttft if stream else None, "".join(parts))

    async def __call__(self, stream: bool) -> Sample:
        return await asyncio.get_running_loop().run_in_executor(self.thread, self._run, stream)

    def close(self) -> None:
        self.engine.close()


# ---------------------------------------------------------------------------------------- backends


@contextlib.asynccontextmanager
async def llama_server(threads: int, parallel: int = 1) -> AsyncIterator[str]:
    """llama.cpp's llama-server on a free loopback port: ``parallel`` slots of CONTEXT tokens each."""
    if not LLAMA_SERVER.exists():
        raise SystemExit(f"{LLAMA_SERVER} is missing: run `make llama-server` (about 5 minutes)")
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        str(LLAMA_SERVER), "--model", str(model_path("smollm2")), "--host", "127.0.0.1", "--port", str(port),
        "--ctx-size", str(CONTEXT * parallel), "--parallel", str(parallel),
        "--threads", str(threads), "--threads-batch", str(threads), "--no-webui",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_until_ready(f"{url}/health", process)
        yield url
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), 30)


async def wait_until_ready(url: str, process: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + SERVER_START_SECONDS
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline and process.returncode is None:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"llama-server did not start (exit code {process.returncode})")


def lllmsd_models(threads: int) -> dict[str, Any]:
    device = {"threads": threads, "batch_threads": threads}
    smol = {"task": "text-completion", "engine": "llama-cpp", "location": str(model_path("smollm2")),
            "context_size": CONTEXT, "ttl": -1}  # fmt: skip
    return {
        "chat": {**smol, "device": device},
        "chat-cold": {**smol, "device": device},  # same file, its own instance: the cold second turn
        "pool": {**smol, "max_instances": POOL_INSTANCES, "device": {"threads": 1, "batch_threads": 1}},
        # one instance whose N slots share one decode per token, as llama-server's --parallel N
        **{f"slots{n}": {**smol, "slots": n, "device": device} for n in (4, 8)},
        "gpt4all": {**smol, "engine": "gpt4all", "location": str(model_path("smollm2-gpt4all")), "device": device},
    }


# ------------------------------------------------------------------------------------ 4. gpt4all

# Greedy and unpenalised on both sides, so both do the same work per token (gpt4all's defaults differ).
GREEDY = {"temperature": 0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}


def load_gpt4all(threads: int) -> Any:
    from gpt4all import GPT4All

    path = model_path("smollm2-gpt4all")
    return GPT4All(path.name, model_path=str(path.parent), allow_download=False, device="cpu", n_threads=threads,
                   n_ctx=CONTEXT, verbose=False)  # fmt: skip


def gpt4all_in_process_call(model: Any, max_tokens: int) -> Call:
    """The package used as its README shows: a chat session with the model's template, then generate."""

    def run(stream: bool) -> Sample:
        start = time.perf_counter()
        ttft: float | None = None
        parts: list[str] = []

        def on_token(token_id: int, text: str) -> bool:
            nonlocal ttft
            ttft = ttft or time.perf_counter() - start
            parts.append(text)
            return True

        with model.chat_session(system_prompt="", prompt_template=CHATML_USER):
            options = {"temp": 0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0, "n_batch": 128}
            if stream:
                for _ in model.generate(STORY, max_tokens=max_tokens, streaming=True, callback=on_token, **options):
                    pass
            else:
                model.generate(STORY, max_tokens=max_tokens, callback=on_token, **options)
        return Sample(len(parts), time.perf_counter() - start, ttft if stream else None, "".join(parts))

    async def call(stream: bool) -> Sample:
        return await asyncio.to_thread(run, stream)

    return call


def gpt4all_http_call(session: aiohttp.ClientSession, url: str, max_tokens: int) -> Call:
    async def call(stream: bool) -> Sample:
        payload = {**body("gpt4all", MESSAGES, max_tokens, stream, True), **GREEDY}
        return await post_chat(session, url, payload)

    return call


# ----------------------------------------------------------------------------- 1. single client


async def single_client(contenders: dict[str, Call], args: argparse.Namespace) -> dict[tuple[str, bool], list[Sample]]:
    results: dict[tuple[str, bool], list[Sample]] = {}
    for stream in (False, True):
        for name, call in contenders.items():
            await call(stream)  # warm-up: first use, cached prompt
            results[(name, stream)] = []
        for _ in range(args.runs):
            for name, call in contenders.items():  # taking turns: drifting load hits everyone alike
                results[(name, stream)].append(await call(stream))
    return results


def print_single(results: dict[tuple[str, bool], list[Sample]], names: list[str], args: argparse.Namespace,
                 title: str, target: float) -> None:  # fmt: skip
    """The table of part 1 (or 4): the last name is lllmsd, compared with each of the others."""
    print(f"\n{title}: {args.max_tokens} tokens, temperature 0, {args.threads} thread(s) for generation "
          f"and prompt, median of {args.runs}")  # fmt: skip
    print(f"{'backend':30} {'tok/s':>8} {'stream tok/s':>13} {'stream TTFT':>12} {'tokens':>7}  same text as (a)")
    reference = results[(names[0], False)][0].text
    rates: dict[tuple[str, bool], float] = {}
    for name in names:
        plain, streamed = results[(name, False)], results[(name, True)]
        rates[(name, False)] = median([s.rate for s in plain])
        rates[(name, True)] = median([s.rate for s in streamed])
        tokens = f"{plain[0].tokens}/{streamed[0].tokens}"
        same = "yes" if plain[0].text == reference and streamed[0].text == reference else "NO"
        ttfts = [s.ttft for s in streamed if s.ttft is not None]
        ttft_text = f"{median(ttfts) * 1000:.0f} ms" if ttfts else "-"
        if plain[0].text is None:  # the bound: no text to compare
            same = "-"
        print(f"{name:30} {rates[(name, False)]:8.1f} {rates[(name, True)]:13.1f} {ttft_text:>12} {tokens:>7}  {same}")
    lllmsd = names[-1]
    for base in names[:-1]:
        ratio = [rates[(lllmsd, s)] / rates[(base, s)] for s in (False, True)]
        label = base.split(" ")[0]
        note = UNTARGETED.get(label) or f"target >= {target}: {verdict(min(ratio) >= target)}"
        print(f"{'lllmsd / ' + label:30} {ratio[0]:8.2f} {ratio[1]:13.2f}   {note}")


# rows of part 1 that lllmsd is compared with for what they show, not against a target
UNTARGETED = {"(bound)": "(llama.cpp alone: the most there is)", "(d)": "(the engine alone: what worker and HTTP cost)"}


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


# --------------------------------------------------------------------------- 2. second-turn TTFT


async def second_turn(session: aiohttp.ClientSession, daemon: str, server: str, args: argparse.Namespace) -> None:
    first = await post_chat(session, daemon, body("chat", MESSAGES, args.max_tokens, False, True))
    turn_two = [*MESSAGES, {"role": "assistant", "content": first.text}, {"role": "user", "content": FOLLOW_UP}]
    warm: list[Sample] = []
    cold: list[Sample] = []
    peer: list[Sample] = []
    for run in range(args.runs + 1):  # the first round is the warm-up
        # Warm: turn one again (as a client would have just sent it), then the follow-up.
        await post_chat(session, daemon, body("chat", MESSAGES, args.max_tokens, False, True))
        w = await post_chat(session, daemon, body("chat", turn_two, TURN_TWO_TOKENS, True, True))
        # Cold: the other instance last evaluated an unrelated conversation.
        await post_chat(session, daemon, body("chat-cold", UNRELATED, 1, False, True))
        c = await post_chat(session, daemon, body("chat-cold", turn_two, TURN_TWO_TOKENS, True, True))
        # llama-server: the same two turns on its one slot.
        await post_chat(session, server, body("smollm2", MESSAGES, args.max_tokens, False, True))
        p = await post_chat(session, server, body("smollm2", turn_two, TURN_TWO_TOKENS, True, True))
        if run:
            warm.append(w)
            cold.append(c)
            peer.append(p)
    warm_ttft, cold_ttft, peer_ttft = (
        median([s.ttft or s.seconds for s in runs]) * 1000 for runs in (warm, cold, peer)
    )
    print(f"\n2. second-turn time to first token (follow-up after a {first.tokens}-token answer), "
          f"median of {args.runs}")  # fmt: skip
    print(f"{'lllmsd without context cache':30} {cold_ttft:8.0f} ms   cached_tokens {cold[0].cached}")
    print(f"{'lllmsd with context cache':30} {warm_ttft:8.0f} ms   cached_tokens {warm[0].cached}")
    print(f"{'llama-server (prompt cache)':30} {peer_ttft:8.0f} ms   cached_tokens {peer[0].cached}")
    print(f"{'lllmsd warm / cold':30} {warm_ttft / cold_ttft:8.2f}      (cold / warm {cold_ttft / warm_ttft:.1f}x)")
    print(f"{'lllmsd warm / llama-server':30} {warm_ttft / peer_ttft:8.2f}")


# ------------------------------------------------------------------------ 3. concurrent clients


async def burst(session: aiohttp.ClientSession, url: str, model: str, clients: int, round_: int,
                max_tokens: int) -> tuple[float, list[float]]:  # fmt: skip
    """``clients`` streaming requests at once, each its own story; (aggregate tok/s, TTFTs)."""

    async def client(i: int) -> Sample:
        topic = TOPICS[i % len(TOPICS)]
        messages = [{"role": "user", "content": f"Write a long story about {topic}. (Take {round_}.)"}]
        return await post_chat(session, url, body(model, messages, max_tokens, True, False))

    start = time.perf_counter()
    samples = await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - start
    return sum(s.tokens for s in samples) / elapsed, [s.ttft or s.seconds for s in samples]


async def concurrent(session: aiohttp.ClientSession, targets: dict[str, tuple[str, str]], clients: int,
                     args: argparse.Namespace) -> dict[str, tuple[float, float]]:  # fmt: skip
    aggregate: dict[str, list[float]] = {name: [] for name in targets}
    ttfts: dict[str, list[float]] = {name: [] for name in targets}
    for url, model in targets.values():  # warm-up: short answers at once load lllmsd's other instances
        await burst(session, url, model, POOL_INSTANCES, 0, TURN_TWO_TOKENS)
    for round_ in range(1, args.bursts + 1):
        for name, (url, model) in targets.items():
            rate, times = await burst(session, url, model, clients, round_, args.max_tokens)
            aggregate[name].append(rate)
            ttfts[name] += times
    return {name: (median(aggregate[name]), median(ttfts[name])) for name in targets}


def decode_bound(threads: int, sequences: int, tokens: int, repeats: int) -> float:
    """What llama.cpp itself does for ``sequences`` answers at once on ``threads`` threads, in tok/s: the
    prompt of every sequence in one batch, then ``tokens`` rounds of one ``llama_decode`` evaluating the
    next token of each (the batching llama-server does), with no sampling, no detokenizing and no server;
    the best of ``repeats`` (a bound: the machine's noise only ever lowers it). A server can stream faster
    than this only when the machine got faster between the two measurements."""
    import llama_cpp

    from lllmsd.engines.llama_cpp.model import share_context

    llama = load_in_process(threads)
    llama.context_params.n_ctx = CONTEXT * sequences
    share_context(llama, sequences)  # as llama-server --parallel N: CONTEXT tokens of KV cache per sequence
    prompt = llama.tokenize(STORY.encode())
    batch = llama_cpp.llama_batch_init(len(prompt) * sequences, 0, 1)
    memory = llama_cpp.llama_get_memory(llama.ctx)

    rates = []
    try:
        for _ in range(repeats):
            llama_cpp.llama_memory_clear(memory, True)
            started = time.perf_counter()
            decode_steps(llama, batch, [(seq, prompt, 0) for seq in range(sequences)])
            for step in range(tokens):  # the tokens do not matter to the cost: the prompt's last, again
                decode_steps(llama, batch, [(seq, [prompt[-1]], len(prompt) + step) for seq in range(sequences)])
            rates.append(sequences * tokens / (time.perf_counter() - started))
    finally:
        llama_cpp.llama_batch_free(batch)
        llama.close()
    return max(rates)


def print_concurrent(figures: dict[str, tuple[float, float]], bound: float, clients: int,
                     args: argparse.Namespace) -> None:  # fmt: skip
    print(f"\n3. {clients} concurrent streaming clients, {args.max_tokens} tokens each, "
          f"{args.bursts} bursts (aggregate: median; TTFT: p50 of all requests)")  # fmt: skip
    print(f"{'backend':44} {'aggregate tok/s':>15} {'p50 TTFT':>10}")
    for name, (rate, ttft) in figures.items():
        print(f"{name:44} {rate:15.1f} {ttft * 1000:7.0f} ms")
    print(f"{f'(bound) bare llama_decode, {clients} sequences, best':44} {bound:15.1f}")
    (server_rate, server_ttft), *ours = figures.values()
    ours_rate, ours_ttft = max(ours)  # lllmsd's best layout
    target = f"   target >= 1.2: {verdict(ours_rate / server_rate >= 1.2)}" if clients == 4 else ""
    ratio = f"{ours_rate / server_rate:15.2f} {ours_ttft / server_ttft:10.2f}"
    print(f"{'lllmsd (best) / llama-server':44} {ratio}{target}")
    print(f"{'llama-server / bound, lllmsd (best) / bound':44} {server_rate / bound:15.2f} {ours_rate / bound:10.2f}")


# -------------------------------------------------------------------------------------------- main


def load_in_process(threads: int) -> Any:
    import llama_cpp

    # flash attention as lllmsd has it by default (and llama-server wherever the device supports it), so
    # the three differ in their loops and transports, not in the attention kernel
    return llama_cpp.Llama(str(model_path("smollm2")), n_ctx=CONTEXT, n_threads=threads,
                           n_threads_batch=threads, flash_attn=True, verbose=False)  # fmt: skip


async def concurrent_part(args: argparse.Namespace, timeout: aiohttp.ClientTimeout) -> None:
    async with (
        Daemon(lllmsd_models(args.threads), concurrency=16) as daemon,
        aiohttp.ClientSession(timeout=timeout) as session,
    ):
        for clients in (4, 8):
            # measured alone, before llama-server starts, while lllmsd's instances are idle
            bound = await asyncio.to_thread(decode_bound, args.threads, clients, args.max_tokens, BOUND_REPEATS)
            async with llama_server(args.threads, parallel=clients) as server:
                targets = {
                    f"(b) llama-server, --parallel {clients}": (server, "smollm2"),
                    f"(c) lllmsd, {POOL_INSTANCES} instances of 1 thread": (daemon, "pool"),
                    f"(c) lllmsd, 1 instance, slots {clients}": (daemon, f"slots{clients}"),
                }
                print_concurrent(await concurrent(session, targets, clients, args), bound, clients, args)
                print(f"   load average {loadavg()}")


async def main(args: argparse.Namespace) -> int:
    print(f"SmolLM2 ({model_path('smollm2').name}), {os.cpu_count()} cores; load average {loadavg()}")
    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=600)
    if args.only_concurrent:
        await concurrent_part(args, timeout)
        print(f"\ntotal {time.perf_counter() - started:.0f} s")
        return 0
    # The in-process contenders all decode on one thread: ggml's CPU backend runs a decode on an OpenMP
    # team of the calling thread, and teams of several threads would spin beside each other.
    decoding = ThreadPoolExecutor(1, thread_name_prefix="in-process")
    llama = await asyncio.to_thread(load_in_process, args.threads)
    bound = await asyncio.to_thread(BareDecode, args.threads, args.max_tokens, decoding)
    engine = await asyncio.to_thread(EngineInProcess, args.threads, args.max_tokens, decoding)
    try:
        async with (
            llama_server(args.threads) as server,
            Daemon(lllmsd_models(args.threads), concurrency=2 * POOL_INSTANCES) as daemon,
            aiohttp.ClientSession(timeout=timeout) as session,
        ):
            contenders = {
                "(a) llama-cpp-python in-process": in_process_call(llama, args.max_tokens, decoding),
                "(b) llama-server over HTTP": http_call(session, server, "smollm2", args.max_tokens, True),
                "(bound) bare llama_decode": bound,
                "(d) lllmsd engine in-process": engine,
                "(c) lllmsd over HTTP": http_call(session, daemon, "chat", args.max_tokens, True),
            }
            single = await single_client(contenders, args)
            print_single(single, list(contenders), args, "1. single client", 1.0)
            print(f"   load average {loadavg()}")
            await second_turn(session, daemon, server, args)
            print(f"   load average {loadavg()}")
    finally:
        llama.close()
        bound.close()
        engine.close()
        decoding.shutdown()
    await concurrent_part(args, timeout)
    if args.gpt4all:
        async with (
            Daemon(lllmsd_models(args.threads), concurrency=2 * POOL_INSTANCES) as daemon,
            aiohttp.ClientSession(timeout=timeout) as session,
        ):
            gpt4all = await asyncio.to_thread(load_gpt4all, args.threads)
            try:
                g4a = {
                    "(a) gpt4all in-process": gpt4all_in_process_call(gpt4all, args.max_tokens),
                    "(c) lllmsd gpt4all engine": gpt4all_http_call(session, daemon, args.max_tokens),
                }
                print_single(await single_client(g4a, args), list(g4a), args, "4. gpt4all, single client", 0.95)
                print(f"   load average {loadavg()}")
            finally:
                gpt4all.close()
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="measured requests per contender and mode")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="threads of every single-stream contender")
    parser.add_argument("--bursts", type=int, default=3, help="measured bursts of concurrent clients")
    parser.add_argument("--no-gpt4all", dest="gpt4all", action="store_false", help="skip part 4")
    parser.add_argument("--only-concurrent", action="store_true", help="part 3 only")
    sys.exit(asyncio.run(main(parser.parse_args())))
