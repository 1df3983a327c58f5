"""Tool calls on SmolLM2: how answers end, and what reading calls back costs.

Part 1 replays the issue's measurement on the real engine (SmolLM2, temperature 0, tool_choice
``required`` and a named function, max_tokens 48 and the default) over a few prompts, and prints per
case: the finish reason, the calls returned, the completion tokens and the seconds. Target: every case
``tool_calls`` with one complete get_weather call first, no call repeated.

Part 2 times the call tracker alone (tools/calls.py) reading a 2,000-token call that streams in 4-character
pieces, the per-token cost the engine adds to generation. Target: well under 1 ms a token.

Run: .venv/bin/python bench/tools.py
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lllmsd.core.jobs import ChatJob, ChatMessage, Sampling, ToolSpec, collect_generation  # noqa: E402
from lllmsd.engines.llama_cpp.tools.calls import CallTracker  # noqa: E402
from lllmsd.engines.llama_cpp.tools.syntax import HERMES  # noqa: E402
from tests.engines.conftest import load_instance  # noqa: E402
from tests.setup_models import model_path  # noqa: E402

WEATHER = ToolSpec(
    "get_weather",
    "Get the current weather in a city",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
    },
)
TIME = ToolSpec(
    "get_time",
    "Get the current time in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
PROMPTS = ["What's the weather in Paris?", "What is the weather like in Paris today?", "Weather in Paris?"]


async def answers() -> None:
    model = {
        "task": "text-completion",
        "engine": "llama-cpp",
        "location": str(model_path("smollm2")),
        "device": {"threads": 1, "batch_threads": 1},
    }
    instance = await load_instance(model, isolation="thread")
    print(f"{'prompt':44} {'choice':12} {'max':>4} {'finish':10} {'tokens':>6} {'s':>5}  calls")
    try:
        for prompt in PROMPTS:
            for choice in ("required", "get_weather"):
                for max_tokens in (48, None):
                    job = ChatJob(
                        (ChatMessage("user", prompt),),
                        Sampling(temperature=0, max_tokens=max_tokens),
                        tools=(WEATHER, TIME),
                        tool_choice=choice,
                    )
                    started = time.perf_counter()
                    result = collect_generation([e async for e in instance.generate(job)])
                    seconds = time.perf_counter() - started
                    answer = result.choices[0]
                    calls = [f"{c.name}{c.arguments}" for c in answer.tool_calls]
                    print(
                        f"{prompt:44} {choice:12} {max_tokens or '-':>4} {answer.finish_reason:10} "
                        f"{result.usage.completion_tokens:>6} {seconds:5.2f}  {calls}"
                    )
    finally:
        await instance.dispose()


def tracker_cost() -> None:
    arguments = json.dumps({"code": "x = 1 + 2  # some code here\n" * 280})
    text = HERMES.calls_text([("run", arguments)])
    pieces = [text[i : i + 4] for i in range(0, len(text), 4)]
    tracker = CallTracker(HERMES, frozenset({"run"}), live=True)
    started = time.perf_counter()
    for piece in pieces:
        tracker.feed(piece)
    end = tracker.finish("stop")
    seconds = time.perf_counter() - started
    print(
        f"tracker: {len(pieces)} pieces, {len(text)} characters, {end.finish_reason}: "
        f"{seconds:.3f} s, {seconds / len(pieces) * 1e6:.0f} us a piece"
    )


if __name__ == "__main__":
    asyncio.run(answers())
    tracker_cost()
