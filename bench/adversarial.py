"""Hostile and careless requests against a daemon running every engine, one case at a time.

Replays the cases of the "no request can crash the daemon" issue against ``lllmsd serve`` (SmolLM2 on
llama-cpp, all-MiniLM on sentence-transformers, Whisper tiny.en on faster-whisper, each in its worker
processes) and prints, per case: the status it got, the seconds it took, the peak RSS of the daemon
plus all its workers while it ran, and the worst latency of a normal request to another model sent
every 200 ms during the attack.

Targets: no crash (the daemon's pid survives every case), no uncontained 5xx (a 5xx must be an OpenAI
error envelope), peak RSS under 2 GiB, normal requests of other models answered within 2 s throughout.

Run: .venv/bin/python bench/adversarial.py [--only NAME ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from pool_overhead import Daemon  # bench/ is the script's folder: its sibling module

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.setup_models import model_path  # noqa: E402

GIB = 2**30
NORMAL_EVERY = 0.2
Attack = Callable[[aiohttp.ClientSession, str], Awaitable[tuple[int, str]]]


def models() -> dict[str, Any]:
    one_thread = {"threads": 1, "batch_threads": 1}
    return {
        "chat": {
            "task": "text-completion",
            "engine": "llama-cpp",
            "location": str(model_path("smollm2")),
            "device": one_thread,
            "max_request_seconds": 60,
            "cancel_grace": 5,
        },
        "emb": {"task": "embedding", "engine": "sentence-transformers", "location": str(model_path("minilm"))},
        "whisper": {
            "task": "speech-to-text",
            "engine": "faster-whisper",
            "location": str(model_path("whisper-tiny-en")),
            "device": {"threads": 1},
        },
    }


# ------------------------------------------------------------------------------------------ requests


async def post_json(session: aiohttp.ClientSession, url: str, body: Any, path: str) -> tuple[int, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(f"{url}{path}", data=data, headers={"Content-Type": "application/json"}) as response:
        return response.status, await response.text()


def chat(extra: dict[str, Any], text: str = "Describe a person.") -> Attack:
    body = {"model": "chat", "max_tokens": 16, "messages": [{"role": "user", "content": text}], **extra}
    return lambda session, url: post_json(session, url, body, "/v1/chat/completions")


def schema(s: dict[str, Any]) -> dict[str, Any]:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": s}}}


def tools(parameters: dict[str, Any]) -> dict[str, Any]:
    function = {"name": "f", "parameters": parameters}
    return {"tools": [{"type": "function", "function": function}], "tool_choice": "required"}


def nested_parens(depth: int) -> str:
    return "root ::= " + "(" * depth + '"a"' + ")" * depth


def huge_grammar(size: int) -> str:
    rules = [f'r{i} ::= "{"x" * 60}{i}"' for i in range(size // 80)]
    return "root ::= r0\n" + "\n".join(rules)


def tokens_that_are(text: str) -> list[int]:
    """The ids of SmolLM2's tokens whose text is exactly ``text`` (its vocabulary alone, no weights)."""
    import llama_cpp

    vocab = llama_cpp.Llama(str(model_path("smollm2")), vocab_only=True, verbose=False)
    wanted = text.encode()
    return [t for t in range(vocab.n_vocab()) if vocab.detokenize([t]) == wanted]


async def grammar_with_its_only_token_banned(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    banned = {str(t): -100 for t in await asyncio.to_thread(tokens_that_are, "a")}
    return await chat({"grammar": 'root ::= "a"', "logit_bias": banned})(session, url)


def token_ids(count: int) -> Attack:
    body = b'{"model": "emb", "input": [' + b",".join(b"1" for _ in range(count)) + b"]}"
    return lambda session, url: post_json(session, url, body, "/v1/embeddings")


def deep_json(depth: int) -> Attack:
    body = ('{"model": "chat", "messages": ' + "[" * depth + "]" * depth + "}").encode()
    return lambda session, url: post_json(session, url, body, "/v1/chat/completions")


def deep_schema(depth: int) -> Attack:
    """A response_format schema of arrays nested ``depth`` deep, written as text (json.dumps would recurse)."""
    nested = '{"type":"array","items":' * depth + '{"type":"string"}' + "}" * depth
    format_ = '{"type":"json_schema","json_schema":{"name":"x","schema":' + nested + "}}"
    body = '{"model":"chat","max_tokens":4,"messages":[{"role":"user","content":"x"}],"response_format":' + format_
    return lambda session, url: post_json(session, url, (body + "}").encode(), "/v1/chat/completions")


def silent_flac(seconds: int) -> Attack:
    async def attack(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
        with tempfile.TemporaryDirectory() as folder:
            flac = Path(folder) / "silence.flac"
            command = ["sox", "-n", "-r", "16000", "-c", "1", str(flac), "trim", "0", str(seconds)]
            await asyncio.to_thread(subprocess.run, command, check=True, capture_output=True)
            audio = flac.read_bytes()
        form = aiohttp.FormData()
        form.add_field("model", "whisper")
        form.add_field("file", audio, filename="silence.flac", content_type="audio/flac")
        async with session.post(f"{url}/v1/audio/transcriptions", data=form) as response:
            return response.status, (await response.text())[:200] + f" ({len(audio)} bytes of FLAC)"

    return attack


def idle_connections(count: int) -> Attack:
    async def attack(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
        host, port = url.removeprefix("http://").split(":")
        sockets = []
        try:
            for _ in range(count):
                sockets.append(await asyncio.open_connection(host, int(port)))
            async with session.get(f"{url}/health") as response:
                return response.status, f"/health with {count} idle connections open"
        finally:
            for _, writer in sockets:
                writer.close()

    return attack


CASES: dict[str, Attack] = {
    "schema maxLength 20000": chat(
        schema({"type": "object", "properties": {"a": {"type": "string", "maxLength": 20000}}})
    ),
    "tool maxItems 20000": chat(tools({"type": "object", "properties": {"a": {"type": "array", "maxItems": 20000}}})),
    "grammar 20000 nested parens": chat({"grammar": nested_parens(20000)}),
    "grammar whose only token is banned": grammar_with_its_only_token_banned,
    "schema enum 200000 values": chat(schema({"type": "string", "enum": [f"v{i}" for i in range(200_000)]})),
    "grammar 21 MB": chat({"grammar": huge_grammar(21_000_000)}),
    "one hour of silent FLAC": silent_flac(3600),
    "repeat_last_n 2**31-1": chat({"repeat_last_n": 2**31 - 1}),
    "4,000,000 token ids": token_ids(4_000_000),
    "minItems 10**7": chat(schema({"type": "array", "minItems": 10**7})),
    "top_k 2**70": chat({"top_k": 2**70}),
    "logit_bias key ²": chat({"logit_bias": {"²": 1}}),
    "JSON nested 100000 deep": deep_json(100_000),
    "schema nested 1000 deep": deep_schema(1000),
    "1100 idle connections": idle_connections(1100),
}


# ------------------------------------------------------------------------------------------ watching


def tree_rss(pid: int) -> int:
    """RSS of a process and its children (the workers), in bytes."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if int(entry) == pid or ppid == pid:
                total += int(Path(f"/proc/{entry}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    return total


@dataclass
class Watch:
    peak_rss: int = 0
    worst_normal: float = 0.0
    normal_failures: int = 0


async def watch(session: aiohttp.ClientSession, url: str, pid: int, case: str, stop: asyncio.Event) -> Watch:
    found = Watch()
    other = "chat" if case in ("4,000,000 token ids",) else "emb"

    async def sample_memory() -> None:
        while not stop.is_set():
            found.peak_rss = max(found.peak_rss, tree_rss(pid))
            await asyncio.sleep(0.05)

    async def normal_requests() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            if other == "emb":
                status, _ = await post_json(
                    session, url, {"model": "emb", "input": "a normal sentence"}, "/v1/embeddings"
                )
            else:
                status, _ = await chat({"max_tokens": 2})(session, url)
            found.worst_normal = max(found.worst_normal, time.perf_counter() - started)
            found.normal_failures += status != 200
            await asyncio.sleep(NORMAL_EVERY)

    await asyncio.gather(sample_memory(), normal_requests())
    return found


def contained(status: int, body: str) -> bool:
    if status < 500:
        return True
    try:
        return "error" in json.loads(body)
    except ValueError:
        return False


async def run(only: list[str]) -> int:
    daemon = Daemon(models(), concurrency=2)
    async with daemon as url, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for warm in ("chat", "emb"):  # load both first: the watch measures serving, not loading
            await (chat({"max_tokens": 1}) if warm == "chat" else token_ids(3))(session, url)
        assert daemon.process is not None
        pid = daemon.process.pid
        print(f"load average {os.getloadavg()[0]:.2f}; daemon pid {pid}; baseline RSS {tree_rss(pid) / GIB:.2f} GiB")
        print(f"{'case':45} {'status':>6} {'seconds':>8} {'peak RSS':>9} {'other p100':>10}  ok")
        failures = 0
        for name, attack in CASES.items():
            if only and name not in only:
                continue
            stop = asyncio.Event()
            watcher = asyncio.ensure_future(watch(session, url, pid, name, stop))
            started = time.perf_counter()
            try:
                status, body = await attack(session, url)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                status, body = 0, f"{type(exc).__name__}: {exc}"
            seconds = time.perf_counter() - started
            stop.set()
            seen = await watcher
            alive = _alive(pid)
            ok = alive and contained(status, body) and seen.peak_rss < 2 * GIB and seen.worst_normal < 2.0
            failures += not ok
            print(
                f"{name:45} {status:>6} {seconds:>8.2f} {seen.peak_rss / GIB:>8.2f}G {seen.worst_normal:>9.2f}s"
                f"  {'yes' if ok else 'NO'}{'' if alive else ' (daemon died)'}"
            )
            if not ok or os.environ.get("VERBOSE"):
                print(f"    {body[:300]!r}")
            if not alive:
                break
        print(f"load average {os.getloadavg()[0]:.2f}; {failures} case(s) missed a target")
        return 1 if failures else 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=[], help="run only these cases (by name)")
    return asyncio.run(run(parser.parse_args().only))


if __name__ == "__main__":
    sys.exit(main())
