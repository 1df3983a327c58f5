"""What passes the grammar bounds, libllama accepts and enforces exactly (tests/unit/test_llama_bounds.py
tests the bounds themselves).

Every grammar here reaches llama.cpp's parser in a subprocess (the vocabulary of SmolLM2 only, no
weights): a grammar that still crashed it (the 20,000 nested groups llama-cpp-python used to write for a
``maxLength``) fails the test instead of killing pytest.
"""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import pairwise
from typing import Any

import pytest

from lllmsd.core.jobs import ToolSpec
from lllmsd.engines.llama_cpp.grammar import schema_grammar
from lllmsd.engines.llama_cpp.tools.call_grammar import call_grammar
from lllmsd.engines.llama_cpp.tools.syntax import SYNTAXES
from tests.setup_models import model_path
from tests.unit.test_llama_bounds import ACCEPTED

pytestmark = pytest.mark.engines

# Runs in the subprocess: for each grammar, whether llama.cpp parses it and, given probes (token texts to
# accept after those of the probes before, then token texts to ask about), which of the asked tokens it
# allows next. Asking (apply) does not move the grammar on; accepting does.
PROBE = r"""
import ctypes, json, sys
import llama_cpp
from llama_cpp import _internals as internals

params = llama_cpp.llama_model_default_params()
params.vocab_only = True
model = internals.LlamaModel(path_model=sys.argv[1], params=params, verbose=False)
vocab = model.vocab
n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)

def token(text):
    ids = model.tokenize(text.encode(), add_bos=False, special=False)
    assert len(ids) == 1, text
    return ids[0]

def allowed(sampler, asked):
    array = (llama_cpp.llama_token_data * n_vocab)()
    for i in range(n_vocab):
        array[i].id, array[i].logit = i, 0.0
    data = llama_cpp.llama_token_data_array(data=array, size=n_vocab, selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(data))
    ok = {array[i].id for i in range(data.size) if array[i].logit != float("-inf")}
    return [token(t) in ok for t in asked]

results = []
for case in json.load(sys.stdin):
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, case["grammar"].encode(), b"root")
    if not sampler:
        results.append(None)
        continue
    answers = []
    for accept, asked in case.get("probes", []):
        for text in accept:
            llama_cpp.llama_sampler_accept(sampler, token(text))
        answers.append(allowed(sampler, asked))
    llama_cpp.llama_sampler_free(sampler)
    results.append(answers)
print(json.dumps(results))
"""


def in_llama(cases: list[dict[str, Any]]) -> list[Any]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(model_path("smollm2"))],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"libllama died ({done.returncode}): {done.stderr[-2000:]}"
    return json.loads(done.stdout)


def test_what_the_gbnf_bounds_accept_llama_cpp_accepts() -> None:
    assert None not in in_llama([{"grammar": grammar} for grammar in ACCEPTED])


def counts_to_probe(low: int, high: int | None) -> list[int]:
    counts = {0, 1, low - 1, low, 499, 500, 501, 1000, 1001, 2000, 2001}
    if high is not None:
        counts |= {high - 1, high}
    return sorted(c for c in counts if 0 <= c <= (low + 5 if high is None else high))


@pytest.mark.parametrize(("low", "high"), [(0, 5), (2, 2500), (0, 20_000), (1500, 4000), (20_000, None), (0, 100_000)])
def test_length_bounds_are_parsed_and_enforced_exactly(low: int, high: int | None) -> None:
    schema: dict[str, Any] = {"type": "string", "minLength": low}
    if high is not None:
        schema["maxLength"] = high
    counts = counts_to_probe(low, high)
    # after the opening quote and n characters: may another come, may the string close?
    probes = [(['"'] * (n == counts[0]) + ["a"] * (n - before), ["a", '"']) for before, n in pairwise([0, *counts])]
    [answers] = in_llama([{"grammar": schema_grammar(schema), "probes": probes}])
    assert answers is not None, "llama.cpp refused the grammar"
    for n, (more, close) in zip(counts, answers, strict=True):
        assert (more, close) == (high is None or n < high, n >= low), n


@pytest.mark.parametrize(("low", "high"), [(0, 3), (2, 1200), (0, 20_000), (700, 2500)])
def test_item_bounds_are_parsed_and_enforced_exactly(low: int, high: int) -> None:
    counts = counts_to_probe(low, high)
    # after "[" and n items: may another come, may the array close?
    probes = [
        (["["] * (n == counts[0]) + _items(before, n), ["," if n else "1", "]"]) for before, n in pairwise([0, *counts])
    ]
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": low, "maxItems": high}
    [answers] = in_llama([{"grammar": schema_grammar(schema), "probes": probes}])
    assert answers is not None, "llama.cpp refused the grammar"
    for n, (more, close) in zip(counts, answers, strict=True):
        assert (more, close) == (n < high, n >= low), n


def _items(before: int, n: int) -> list[str]:
    """The tokens of items ``before`` to ``n`` of an array of 1s."""
    tokens: list[str] = []
    for index in range(before, n):
        tokens += [","] if index else []
        tokens.append("1")
    return tokens


def test_every_bound_the_api_admits_makes_a_grammar_llama_cpp_accepts() -> None:
    grammars = []
    for high in (1, 499, 500, 501, 1000, 2000, 2001, 20_000, 100_000):
        for low in sorted({0, 1, high // 2, high}):
            for leaf in (
                {"type": "string", "minLength": low, "maxLength": high},
                {"type": "array", "items": {"type": "integer"}, "minItems": low, "maxItems": high},
                {
                    "type": "array",
                    "items": {"type": "object", "properties": {"z": {}}},
                    "minItems": low,
                    "maxItems": high,
                },
                {"type": "string", "pattern": f"^(ab|c){{{low},{high}}}$"},
            ):
                schema = {"type": "object", "properties": {"x": leaf}}
                grammars.append(schema_grammar(schema))
                tools = (
                    ToolSpec("t", parameters=schema),
                    ToolSpec("u", parameters={"type": "object", "properties": {"y": leaf}}),
                )
                # every family's call syntax around the same argument rules
                grammars += [call_grammar(tools, syntax, parallel=True) for syntax in SYNTAXES.values()]
    results = in_llama([{"grammar": grammar} for grammar in grammars])
    assert None not in results, [g[:300] for g, r in zip(grammars, results, strict=True) if r is None][:3]
