"""A long fuzzing run of every route (the suite's tests/api/test_fuzz.py runs a few examples of each).

Schemathesis sends generated requests, valid and invalid by the daemon's own /openapi.json, to a daemon on
the FakeEngine (and with --llama, to SmolLM2 on llama-cpp); every answer must be: no 5xx, a documented
status and content type, a body that matches its schema, a 4xx for invalid JSON, within 30 s. Random
(not derandomized) unless --seed is given, so each run explores new inputs. Prints each failure found
with a curl line to reproduce it.

Run: .venv/bin/python bench/fuzz.py [--examples 100] [--llama] [--seed N]    (or: make fuzz)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.api.fuzzing import DaemonThread, Finding, fuzz_operation, load_schema, operations  # noqa: E402
from tests.api.test_fuzz import FAKE_MODELS, llama_models, small_generation  # noqa: E402
from tests.conftest import make_config  # noqa: E402


def fuzz(daemon: DaemonThread, model_ids: list[str], examples: int, seed: int | None, **options: object) -> int:
    schema = load_schema(daemon.url)
    findings: list[Finding] = []
    prefixes = options.pop("prefixes", ("/v1", "/openai/v1", "/"))
    for operation in operations(schema, prefixes=prefixes):  # type: ignore[arg-type]
        for mode in ("positive", "negative"):
            started = time.perf_counter()
            found = fuzz_operation(
                operation, daemon.url, mode, max_examples=examples, model_ids=model_ids, seed=seed, **options
            )
            findings += found
            print(f"{operation.label:<42} {mode:<9} {len(found)} failures  {time.perf_counter() - started:6.1f} s")
    for finding in findings:
        print(f"\n--- [{finding.mode}] {finding.operation}\n{finding.error}")
    return len(findings)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=100, help="examples per route and mode")
    parser.add_argument("--llama", action="store_true", help="also fuzz chat and completions on SmolLM2")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    with DaemonThread(make_config(FAKE_MODELS, concurrency=4)) as daemon:
        failures = fuzz(daemon, list(FAKE_MODELS), args.examples, args.seed)
    if args.llama:
        with DaemonThread(make_config(llama_models())) as daemon:
            failures += fuzz(
                daemon,
                ["smol"],
                max(args.examples // 5, 10),
                args.seed,
                edit=small_generation,
                prefixes=("/v1/chat", "/v1/completions"),
            )
    print(f"\n{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
