"""Chat speed on SmolLM2: llama-cpp-python in-process vs its own OpenAI server vs lllmsd, in one run.

1. Single client, same prompt, ``--max-tokens`` tokens at temperature 0, same threads everywhere
   (``--threads`` for generation and prompt evaluation), non-stream and stream:
     (a) llama-cpp-python in-process: ``Llama.create_chat_completion``
     (b) ``python -m llama_cpp.server`` over HTTP (``pip install 'llama-cpp-python[server]'``)
     (c) ``lllmsd serve`` over HTTP, llama-cpp engine, max_instances 1
   Completion tokens per second of wall time per request (the repeated prompt is cached by all three),
   median of ``--runs`` after one warm-up each; the contenders take turns so drifting load hits all
   alike. Ratios lllmsd/(a) (target >= 0.95) and lllmsd/(b).
2. Second-turn time to first token on lllmsd: the follow-up turn sent to the instance that answered
   turn one (its context cache holds the conversation) vs to a second model id on the same file whose
   instance holds an unrelated conversation (cold); ``cached_tokens`` from usage shows which is which.
3. ``--clients`` concurrent streaming clients, each with its own prompt: aggregate tokens/s and p50 time
   to first token of lllmsd (max_instances 2, default threads: one per instance when two share 2 cores)
   against llama_cpp.server, which serves them one after another. Targets: aggregate >= 1.5x, p50
   TTFT <= 0.5x the server's.
4. gpt4all on the same SmolLM2 (its metadata rewritten for gpt4all's older llama.cpp): the gpt4all package
   in-process (``GPT4All.chat_session`` with the ChatML template, ``generate``) vs lllmsd's gpt4all engine
   over HTTP, same prompt, tokens, threads and greedy sampling, non-stream and stream. Ratio lllmsd/(a)
   (target >= 0.95).

Run: .venv/bin/python bench/chat_throughput.py [--runs 3] [--max-tokens 128] [--threads 1] [--bursts 3]
ggml threads spin-wait, so other load on the machine changes the figures a lot: compare within one run
(the load average is printed with each part).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
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
TOPICS = ["a dragon in a castle by the sea", "a robot learning to paint", "a lighthouse keeper's cat",
          "a city under the ice", "a baker who can fly", "a map that redraws itself"]  # fmt: skip
CONTEXT = 4096
TURN_TWO_TOKENS = 8  # only the first token's time matters for the follow-up turn
SERVER_START_SECONDS = 60


@dataclass(frozen=True)
class Sample:
    tokens: int
    seconds: float
    ttft: float | None = None
    text: str = ""
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
        "repeat_penalty": 1.0,  # llama_cpp.server's own default is 1.1; OpenAI (and lllmsd) have none
        "stream": stream,
    }  # fmt: skip
    if stream and usage:  # llama_cpp.server does not know stream_options
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


def in_process_call(llama: Any, max_tokens: int) -> Call:
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
        return await asyncio.to_thread(run, stream)

    return call


# ---------------------------------------------------------------------------------------- backends


@contextlib.asynccontextmanager
async def llama_cpp_server(threads: int) -> AsyncIterator[str]:
    """``python -m llama_cpp.server`` on a free port; requests queue rather than interrupt each other."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llama_cpp.server", "--model", str(model_path("smollm2")), "--port", str(port),
        "--n_ctx", str(CONTEXT), "--n_threads", str(threads), "--n_threads_batch", str(threads),
        # Its default cuts a running stream short as soon as another request arrives.
        "--interrupt_requests", "False",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_until_ready(f"{url}/v1/models", process)
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
    raise RuntimeError(f"llama_cpp.server did not start (exit code {process.returncode})")


def lllmsd_models(threads: int) -> dict[str, Any]:
    device = {"threads": threads, "batch_threads": threads}
    smol = {"task": "text-completion", "engine": "llama-cpp", "location": str(model_path("smollm2")),
            "context_size": CONTEXT, "ttl": -1}  # fmt: skip
    return {
        "chat": {**smol, "device": device},
        "chat-cold": {**smol, "device": device},  # same file, its own instance: the cold second turn
        "pool": {**smol, "max_instances": 2},  # default threads: the engine divides the cores
        "gpt4all": {**smol, "engine": "gpt4all", "location": str(model_path("smollm2-gpt4all")), "device": device},
    }


# ------------------------------------------------------------------------------------ 4. gpt4all

# Greedy and unpenalised on both sides, so both do the same work per token (gpt4all's defaults differ).
GREEDY = {"temperature": 0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}
CHATML_USER = "<|im_start|>user\n{0}<|im_end|>\n<|im_start|>assistant\n"


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
                 title: str = "1. single client") -> None:  # fmt: skip
    print(f"\n{title}: {args.max_tokens} tokens, temperature 0, {args.threads} thread(s) for generation "
          f"and prompt, median of {args.runs}")  # fmt: skip
    print(f"{'backend':30} {'tok/s':>8} {'stream tok/s':>13} {'stream TTFT':>12} {'tokens':>7}  same text as (a)")
    reference = results[(names[0], False)][0].text
    rates: dict[tuple[str, bool], float] = {}
    for name in names:
        plain, streamed = results[(name, False)], results[(name, True)]
        rates[(name, False)] = median([s.rate for s in plain])
        rates[(name, True)] = median([s.rate for s in streamed])
        ttft = median([s.ttft for s in streamed if s.ttft is not None]) * 1000
        tokens = f"{plain[0].tokens}/{streamed[0].tokens}"
        same = "yes" if plain[0].text == reference and streamed[0].text == reference else "NO"
        print(f"{name:30} {rates[(name, False)]:8.1f} {rates[(name, True)]:13.1f} {ttft:9.0f} ms {tokens:>7}  {same}")
    lllmsd = names[-1]
    for base in names[:-1]:
        ratio = [rates[(lllmsd, s)] / rates[(base, s)] for s in (False, True)]
        target = f"   target >= 0.95: {verdict(min(ratio) >= 0.95)}" if base == names[0] else ""
        print(f"{'lllmsd / ' + base[:3]:30} {ratio[0]:8.2f} {ratio[1]:13.2f}{target}")


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


# --------------------------------------------------------------------------- 2. second-turn TTFT


async def second_turn(session: aiohttp.ClientSession, url: str, args: argparse.Namespace) -> None:
    first = await post_chat(session, url, body("chat", MESSAGES, args.max_tokens, False, True))
    turn_two = [*MESSAGES, {"role": "assistant", "content": first.text}, {"role": "user", "content": FOLLOW_UP}]
    warm: list[Sample] = []
    cold: list[Sample] = []
    for run in range(args.runs + 1):  # the first round is the warm-up
        # Warm: turn one again (as a client would have just sent it), then the follow-up.
        await post_chat(session, url, body("chat", MESSAGES, args.max_tokens, False, True))
        w = await post_chat(session, url, body("chat", turn_two, TURN_TWO_TOKENS, True, True))
        # Cold: the other instance last evaluated an unrelated conversation.
        await post_chat(session, url, body("chat-cold", UNRELATED, 1, False, True))
        c = await post_chat(session, url, body("chat-cold", turn_two, TURN_TWO_TOKENS, True, True))
        if run:
            warm.append(w)
            cold.append(c)
    warm_ttft = median([s.ttft or s.seconds for s in warm]) * 1000
    cold_ttft = median([s.ttft or s.seconds for s in cold]) * 1000
    print(f"\n2. lllmsd second-turn time to first token (follow-up after a {first.tokens}-token answer), "
          f"median of {args.runs}")  # fmt: skip
    print(f"{'without context cache (cold)':30} {cold_ttft:8.0f} ms   cached_tokens {cold[0].cached}")
    print(f"{'with context cache (warm)':30} {warm_ttft:8.0f} ms   cached_tokens {warm[0].cached}")
    print(f"{'warm / cold':30} {warm_ttft / cold_ttft:8.2f}      (cold / warm {cold_ttft / warm_ttft:.1f}x)")


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


async def concurrent(session: aiohttp.ClientSession, targets: dict[str, tuple[str, str]],
                     args: argparse.Namespace) -> dict[str, tuple[float, float]]:  # fmt: skip
    aggregate: dict[str, list[float]] = {name: [] for name in targets}
    ttfts: dict[str, list[float]] = {name: [] for name in targets}
    for url, model in targets.values():  # warm-up: two short answers at once load lllmsd's 2nd instance
        await burst(session, url, model, 2, 0, TURN_TWO_TOKENS)
    for round_ in range(1, args.bursts + 1):
        for name, (url, model) in targets.items():
            rate, times = await burst(session, url, model, args.clients, round_, args.max_tokens)
            aggregate[name].append(rate)
            ttfts[name] += times
    return {name: (median(aggregate[name]), median(ttfts[name])) for name in targets}


def print_concurrent(figures: dict[str, tuple[float, float]], args: argparse.Namespace) -> None:
    print(f"\n3. {args.clients} concurrent streaming clients, {args.max_tokens} tokens each, "
          f"{args.bursts} bursts (aggregate: median; TTFT: p50 of all requests)")  # fmt: skip
    print(f"{'backend':44} {'aggregate tok/s':>15} {'p50 TTFT':>10}")
    for name, (rate, ttft) in figures.items():
        print(f"{name:44} {rate:15.1f} {ttft * 1000:7.0f} ms")
    (server_rate, server_ttft), (ours_rate, ours_ttft) = figures.values()
    print(f"{'lllmsd / llama_cpp.server':44} {ours_rate / server_rate:15.2f} {ours_ttft / server_ttft:10.2f}")
    print(f"{'targets':44} {'>= 1.5 ' + verdict(ours_rate / server_rate >= 1.5):>15} "
          f"{'<= 0.5 ' + verdict(ours_ttft / server_ttft <= 0.5):>10}")  # fmt: skip


# -------------------------------------------------------------------------------------------- main


def load_in_process(threads: int) -> Any:
    import llama_cpp

    return llama_cpp.Llama(str(model_path("smollm2")), n_ctx=CONTEXT, n_threads=threads,
                           n_threads_batch=threads, verbose=False)  # fmt: skip


async def main(args: argparse.Namespace) -> int:
    if not (importlib.util.find_spec("llama_cpp.server") and importlib.util.find_spec("uvicorn")):
        print("llama_cpp.server is missing: .venv/bin/pip install 'llama-cpp-python[server]==0.3.36'")
        return 2
    print(f"SmolLM2 ({model_path('smollm2').name}), {os.cpu_count()} cores; load average {loadavg()}")
    started = time.perf_counter()
    llama = await asyncio.to_thread(load_in_process, args.threads)
    try:
        async with (
            llama_cpp_server(args.threads) as server,
            Daemon(lllmsd_models(args.threads)) as daemon,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session,
        ):
            contenders = {
                "(a) llama-cpp-python in-process": in_process_call(llama, args.max_tokens),
                "(b) llama_cpp.server over HTTP": http_call(session, server, "smollm2", args.max_tokens, False),
                "(c) lllmsd over HTTP": http_call(session, daemon, "chat", args.max_tokens, True),
            }
            single = await single_client(contenders, args)
            print_single(single, list(contenders), args)
            print(f"   load average {loadavg()}")
            await second_turn(session, daemon, args)
            print(f"   load average {loadavg()}")
            targets = {
                "(b) llama_cpp.server (one after another)": (server, "smollm2"),
                "(c) lllmsd, max_instances 2, default threads": (daemon, "pool"),
            }
            print_concurrent(await concurrent(session, targets, args), args)
            print(f"   load average {loadavg()}")
            gpt4all = await asyncio.to_thread(load_gpt4all, args.threads)
            try:
                g4a = {
                    "(a) gpt4all in-process": gpt4all_in_process_call(gpt4all, args.max_tokens),
                    "(c) lllmsd gpt4all engine": gpt4all_http_call(session, daemon, args.max_tokens),
                }
                print_single(await single_client(g4a, args), list(g4a), args, "4. gpt4all, single client")
                print(f"   load average {loadavg()}")
            finally:
                gpt4all.close()
    finally:
        llama.close()
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="measured requests per contender and mode")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="single-client part: threads of every contender")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--bursts", type=int, default=3, help="measured bursts of concurrent clients")
    sys.exit(asyncio.run(main(parser.parse_args())))
