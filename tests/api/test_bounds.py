"""No request can crash the daemon or take more than its share: every bound answers a 400 naming the
parameter (and the path of the keyword inside a JSON Schema) with a non-null code, before any engine
work, and a normal request is served right after (docs/hardening.md, "Bounds on one request").

The first part runs on the FakeEngine: the bounds checked by the wire schemas. The second part
(``engines``) runs SmolLM2 under llama-cpp, in its worker process as the daemon runs it, for what only
that engine can judge (GBNF grammars, the vocabulary, the context) and for the cases that used to
crash libllama: there a regression kills the worker and fails the test, never pytest itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from lllmsd.api.schemas.json_schema import (
    MAX_BOUND,
    MAX_ENUM_VALUES,
    MAX_SCHEMA_DEPTH,
    MAX_SCHEMA_PROPERTIES,
)
from tests.conftest import AppFactory, fake_model, make_config
from tests.setup_models import model_path
from tests.shared_daemon import RemoteClient, ThreadedDaemon, shared_daemon

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
FORMAT = "response_format.json_schema.schema"


def nested_object(levels: int, leaf: dict[str, Any] | None = None) -> dict[str, Any]:
    """``levels`` subschemas on one chain: objects with one property ``a``, the innermost ``leaf``."""
    schema = leaf or {"type": "string"}
    for _ in range(levels - 1):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def json_schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}


def tool(parameters: dict[str, Any], name: str = "f") -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


Client = TestClient | RemoteClient  # a test's own app, or the module's shared llama daemon


async def post(client: Client, path: str, body: dict[str, Any] | bytes) -> tuple[int, dict[str, Any]]:
    if isinstance(body, bytes):
        response = await client.post(path, data=body, headers={"Content-Type": "application/json"})
    else:
        response = await client.post(path, json=body)
    return response.status, await response.json()


def assert_refused(status: int, body: dict[str, Any], param: str, *words: str) -> None:
    assert status == 400, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert error["code"] == "invalid_value", error
    assert error["type"] == "invalid_request_error"
    for word in words:
        assert word in error["message"], error["message"]


async def served(client: Client, model: str = "chat") -> None:
    """A normal request right after a refused one is answered."""
    status, body = await post(client, CHAT, {"model": model, "messages": USER, "max_tokens": 4})
    assert status == 200, body


@pytest.fixture
async def client(start_app: AppFactory) -> TestClient:
    return await start_app(
        make_config({"chat": fake_model(), "emb": {"task": "embedding", "engine": "fake", "dimensions": 8}})
    )


# ------------------------------------------------------------------------------ JSON Schema bounds


@pytest.mark.parametrize(
    ("schema", "where", "words"),
    [
        # the ranges of the length and item bounds
        (
            {"type": "object", "properties": {"x": {"type": "string", "maxLength": MAX_BOUND + 1}}},
            ".properties.x.maxLength",
            ["100,000"],
        ),
        ({"type": "array", "items": {"type": "integer"}, "minItems": 10**7}, ".minItems", ["100,000"]),
        ({"type": "string", "minLength": -1}, ".minLength", ["non-negative integer"]),
        ({"type": "string", "maxLength": 5.5}, ".maxLength", ["integer"]),
        ({"type": "string", "maxLength": True}, ".maxLength", ["integer"]),
        ({"type": "object", "maxProperties": 2**70}, ".maxProperties", ["100,000"]),
        ({"type": "string", "minLength": 5, "maxLength": 4}, ".maxLength", ["below minLength"]),
        ({"type": "string", "pattern": "^a{0,200000}$"}, ".pattern", ["100,000"]),
        ({"type": "string", "pattern": "^" + "(" * 40 + "a" + ")" * 40 + "$"}, ".pattern", ["nested"]),
        # size: nesting, properties, enum values, characters, the bounds together
        (nested_object(MAX_SCHEMA_DEPTH + 1), ".properties.a" * MAX_SCHEMA_DEPTH, ["32 levels"]),
        (
            {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(MAX_SCHEMA_PROPERTIES + 1)}},
            ".properties",
            ["5000 properties"],
        ),
        ({"enum": list(range(MAX_ENUM_VALUES + 1))}, ".enum", ["1000 enum values"]),
        ({"enum": [f"v{i}" for i in range(200_000)]}, ".enum", ["1000 enum values"]),
        ({"enum": ["x" * 60 + str(i) for i in range(251)]}, ".enum", ["15,000 characters"]),
        ({"const": "c" * 120_001}, ".const", ["120,000 characters"]),
        # alternatives open at one point: a union's branches (through nested unions), optional properties
        (
            {"anyOf": [{"type": "object", "properties": {f"k{i}": {}}} for i in range(1001)]},
            ".anyOf",
            ["1000 alternatives"],
        ),
        (
            {"oneOf": [{"anyOf": [{"type": "integer"}] * 600}, {"anyOf": [{"type": "string"}] * 401}]},
            ".oneOf",
            ["1000"],
        ),
        ({"type": "object", "properties": {f"p{i}": {} for i in range(1001)}}, ".properties", ["1001 optional"]),
        (
            {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 2000} for i in range(101)}},
            ".properties.p100.maxLength",
            ["200,000"],
        ),
    ],
)
async def test_json_schema_bounds_are_400_naming_the_keyword(
    client: TestClient, schema: dict[str, Any], where: str, words: list[str]
) -> None:
    started = time.perf_counter()
    body = {"model": "chat", "messages": USER, "response_format": json_schema_format(schema)}
    status, answer = await post(client, CHAT, body)
    assert_refused(status, answer, FORMAT + where, *words)
    assert time.perf_counter() - started < 5
    await served(client)


async def test_schema_bounds_follow_ref_and_count_every_tool_of_the_request(client: TestClient) -> None:
    # a chain of $ref is nesting too (the converter recursed once per link until the stack ran out)
    chain = {f"d{i}": {"type": "array", "items": {"$ref": f"#/$defs/d{i + 1}"}} for i in range(40)}
    chain["d40"] = {"type": "string"}
    status, body = await post(
        client, CHAT, {"model": "chat", "messages": USER, "tools": [tool({"$defs": chain, "$ref": "#/$defs/d0"})]}
    )
    assert_refused(status, body, body["error"]["param"], "32 levels")
    assert body["error"]["param"].startswith("tools[0].function.parameters.$defs.d0.items.$ref.items.$ref")
    # a recursive schema is fine: generation bounds how deep its output goes
    tree = {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#"}}}}
    status, body = await post(client, CHAT, {"model": "chat", "messages": USER, "tools": [tool(tree)]})
    assert status == 200, body
    # the tools of one request share the budget: 3 x 2,000 properties
    names = [f"p{i}" for i in range(2000)]
    wide = {"type": "object", "properties": {name: {"type": "integer"} for name in names}, "required": names}
    tools = [tool(wide, name) for name in ("a", "b", "c")]
    status, body = await post(client, CHAT, {"model": "chat", "messages": USER, "tools": tools})
    assert_refused(status, body, "tools[2].function.parameters.properties", "5000 properties")
    await served(client)


async def test_large_but_bounded_schemas_pass_the_wire(client: TestClient) -> None:
    # maxLength 20,000 and maxItems 20,000 (what agent frameworks write) are within the bounds
    parameters = {
        "type": "object",
        "properties": {"text": {"type": "string", "maxLength": 20_000}, "ids": {"type": "array", "maxItems": 20_000}},
    }
    body = {"model": "chat", "messages": USER, "tools": [tool(parameters)], "tool_choice": "required"}
    status, answer = await post(client, CHAT, body)
    assert status == 200, answer
    deep = nested_object(MAX_SCHEMA_DEPTH)
    status, answer = await post(client, CHAT, {"model": "chat", "messages": USER, "tools": [tool(deep)]})
    assert status == 200, answer


async def test_too_many_tools_is_400(client: TestClient) -> None:
    tools = [tool({"type": "object"}, f"f{i}") for i in range(129)]
    status, body = await post(client, CHAT, {"model": "chat", "messages": USER, "tools": tools})
    assert_refused(status, body, "tools", "128")
    await served(client)


# ------------------------------------------------------------------------------ integer and sampling fields


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        (CHAT, "top_k", 2**70),
        (CHAT, "top_k", 2**31),
        (CHAT, "top_k", -1),
        (CHAT, "seed", 2**63),
        (CHAT, "seed", -(2**63) - 1),
        (CHAT, "n", 17),
        (CHAT, "max_tokens", 2**31),
        (CHAT, "max_completion_tokens", 2**40),
        (CHAT, "top_logprobs", 21),
        (CHAT, "repeat_last_n", 2**31 - 1),
        (CHAT, "repeat_last_n", -1),
        (CHAT, "temperature", 2.5),
        (CHAT, "top_p", 1.5),
        (CHAT, "min_p", -0.1),
        (CHAT, "frequency_penalty", 3),
        ("/v1/completions", "best_of", 17),
        ("/v1/completions", "logprobs", 6),
        ("/v1/completions", "max_tokens", 2**64),
    ],
)
async def test_out_of_range_fields_are_400_naming_them(client: TestClient, path: str, field: str, value: Any) -> None:
    body: dict[str, Any] = {"model": "chat", field: value}
    body.update({"messages": USER} if path == CHAT else {"prompt": "hi"})
    if field == "top_logprobs":
        body["logprobs"] = True
    status, answer = await post(client, path, body)
    assert_refused(status, answer, field)
    await served(client)


async def test_integer_fields_at_their_limits_are_accepted(client: TestClient) -> None:
    body = {
        "model": "chat",
        "messages": USER,
        "max_tokens": 4,
        "seed": -(2**63),
        "top_k": 2**31 - 1,
        "repeat_last_n": 1_048_576,
    }
    status, answer = await post(client, CHAT, body)
    assert status == 200, answer
    status, answer = await post(client, CHAT, {**body, "seed": 2**63 - 1})
    assert status == 200, answer


@pytest.mark.parametrize("key", ["²", "٣", "-5", "1e3", " 5", "5 ", "0x1f", "", "1234567890"])
async def test_logit_bias_keys_must_be_ascii_token_ids(client: TestClient, key: str) -> None:
    body = {"model": "chat", "messages": USER, "logit_bias": {key: -100}}
    status, answer = await post(client, CHAT, body)
    assert_refused(status, answer, "logit_bias", "token ids")
    await served(client)


@pytest.mark.parametrize("bias", [{"5": 100.5}, {"5": -101}, {str(i): 1 for i in range(1025)}])
async def test_logit_bias_values_and_size_are_bounded(client: TestClient, bias: dict[str, float]) -> None:
    status, answer = await post(client, CHAT, {"model": "chat", "messages": USER, "logit_bias": bias})
    assert_refused(status, answer, "logit_bias")
    await served(client)


# ------------------------------------------------------------------------------ embeddings


def token_body(count: int) -> bytes:
    """An embeddings body with one input of ``count`` token ids, built fast."""
    ids = b",".join([b"1"] * count)
    return b'{"model": "emb", "input": [' + ids + b"]}"


async def test_four_million_token_ids_are_refused_quickly(client: TestClient) -> None:
    body = token_body(4_000_000)
    started = time.perf_counter()
    status, answer = await post(client, "/v1/embeddings", body)
    elapsed = time.perf_counter() - started
    print(f"4,000,000 token ids ({len(body) / 1e6:.1f} MB) refused in {elapsed:.3f}s")  # checked by hand: < 1 s
    assert_refused(status, answer, "input", "8192")
    status, answer = await post(client, "/v1/embeddings", {"model": "emb", "input": "fine"})
    assert status == 200, answer


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ([1] * 8193, ["8193", "8192"]),
        ([[1] * 8000] * 38, ["300,000"]),
        ([[1], [1] * 8193], ["input[1]", "8192"]),
        ([2**31], ["2**31"]),
        ([[3, 2**40]], ["input[0][1]"]),
        ("x" * 100_001, ["100,000"]),
        (["a", "x" * 100_001], ["input[1]", "100,000"]),
        (["x" * 100_000] * 16, ["1,500,000"]),
    ],
)
async def test_embedding_input_bounds(client: TestClient, value: Any, words: list[str]) -> None:
    status, answer = await post(client, "/v1/embeddings", {"model": "emb", "input": value})
    assert_refused(status, answer, "input", *words)
    status, answer = await post(client, "/v1/embeddings", {"model": "emb", "input": [[1] * 8192, [2] * 8192]})
    assert status == 200, answer


# ------------------------------------------------------------------------------ llama-cpp (real weights)


def smollm2(**options: Any) -> dict[str, Any]:
    return {
        "task": "text-completion",
        "engine": "llama-cpp",
        "location": str(model_path("smollm2")),
        "device": {"threads": 1, "batch_threads": 1},
        **options,
    }


@pytest.fixture(scope="module")
def llama_daemon() -> Iterator[ThreadedDaemon]:
    """One daemon for every hostile request below: each test ends by checking it still serves both models,
    so what one test did to it is what the next one must survive too."""
    # the engines run in their worker processes (the default): a crash there fails a request, not pytest
    minilm = {"task": "embedding", "engine": "sentence-transformers", "location": str(model_path("minilm"))}
    with shared_daemon(make_config({"smol": smollm2(context_size=512), "minilm": minilm})) as daemon:
        yield daemon


@pytest.fixture
async def llama(llama_daemon: ThreadedDaemon) -> AsyncIterator[RemoteClient]:
    client = RemoteClient(llama_daemon.url)
    yield client
    await client.close()


async def chat_and_embeddings_served(client: Client) -> None:
    """After a hostile request, a normal chat and a normal embedding request are both answered."""
    await served(client, "smol")
    status, body = await post(client, "/v1/embeddings", {"model": "minilm", "input": "a normal sentence"})
    assert status == 200, body
    assert len(body["data"][0]["embedding"]) == 384


def vocab_pieces() -> dict[int, bytes]:
    import llama_cpp
    from llama_cpp import _internals as internals

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = internals.LlamaModel(path_model=str(model_path("smollm2")), params=params, verbose=False)
    try:
        return {t: model.token_to_piece(t) for t in range(llama_cpp.llama_vocab_n_tokens(model.vocab))}
    finally:
        model.close()


def smol_chat(**extra: Any) -> dict[str, Any]:
    return {"model": "smol", "messages": [{"role": "user", "content": "Give me JSON."}], "max_tokens": 12, **extra}


@pytest.mark.engines
async def test_llama_large_length_and_item_bounds_are_enforced_not_crashed(llama: RemoteClient) -> None:
    # maxLength 20,000: libllama's parser died on the nested groups llama-cpp-python wrote for it
    schema = {
        "type": "object",
        "properties": {"text": {"type": "string", "minLength": 1, "maxLength": 20_000}},
        "required": ["text"],
    }
    status, body = await post(llama, CHAT, smol_chat(response_format=json_schema_format(schema), max_tokens=40))
    assert status == 200, body
    content = body["choices"][0]["message"]["content"]
    assert content.startswith("{"), content
    assert '"text"' in content, content
    # maxItems 20,000 in a tool's parameters with tool_choice required
    parameters = {
        "type": "object",
        "properties": {"ids": {"type": "array", "items": {"type": "integer"}, "maxItems": 20_000}},
        "required": ["ids"],
    }
    body = smol_chat(tools=[tool(parameters, "pick")], tool_choice="required", max_tokens=20)
    status, answer = await post(llama, CHAT, body)
    assert status == 200, answer
    choice = answer["choices"][0]
    if choice["finish_reason"] == "tool_calls":
        assert choice["message"]["tool_calls"][0]["function"]["name"] == "pick"
    else:  # a call cut off by max_tokens comes back as its text, never as a call (docs/tools.md)
        assert choice["finish_reason"] == "length", choice
        assert choice["message"].get("tool_calls") is None, choice
        assert '"pick"' in choice["message"]["content"], choice
    await chat_and_embeddings_served(llama)


@pytest.mark.engines
@pytest.mark.parametrize(
    ("grammar", "words"),
    [
        ("root ::= " + "(" * 20_000 + '"a"' + ")" * 20_000, ["nested deeper than 64"]),
        ('root ::= "' + "a" * 70_000 + '"', ["65536"]),
        (
            "root ::= r0\n" + "".join(f'r{i} ::= r{i + 1} "x" | "y"\n' for i in range(100)) + 'r100 ::= "z"',
            ["64 levels"],
        ),
        (
            "root ::= r0\n" + "".join(f'r{i} ::= r{i + 1} "x" | r{i + 1} "y"\n' for i in range(16)) + 'r16 ::= "z"',
            ["ambiguous"],
        ),
        ('root ::= "a"{5,3}', ["maximum below its minimum"]),
        ('root ::= "a"{0,2001}', ["2000"]),
        ("root ::= (", ["expecting"]),
        ('root ::= x "a"', ["not defined"]),
        ("root ::= <notatoken>", ["not one token"]),  # judged in the worker, with the vocabulary
    ],
)
async def test_llama_grammar_bounds_are_400_naming_grammar(
    llama: RemoteClient, grammar: str, words: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    completion = {"model": "smol", "prompt": "x", "grammar": grammar}
    for path, body in ((CHAT, smol_chat(grammar=grammar)), ("/v1/completions", completion)):
        status, answer = await post(llama, path, body)
        assert_refused(status, answer, "grammar", *words)
    await chat_and_embeddings_served(llama)
    await asyncio.sleep(0.2)  # the daemon logs what the worker writes as it reads it
    # refused before llama.cpp's parser, which writes a grammar it rejects to stderr in full (the daemon
    # logs the worker's stderr)
    assert not [r for r in caplog.records if "error parsing grammar" in r.getMessage()]


@pytest.mark.engines
async def test_llama_logit_bias_banning_every_token_a_grammar_allows_does_not_abort(llama: RemoteClient) -> None:
    pieces = vocab_pieces()
    # json_object must start with "{" (after optional whitespace): ban every such token, and whitespace
    brace = {str(t): -100 for t, p in pieces.items() if p.lstrip().startswith(b"{") or (p and not p.strip())}
    for temperature in (0, 1):
        body = smol_chat(response_format={"type": "json_object"}, logit_bias=brace, temperature=temperature, seed=1)
        status, answer = await post(llama, CHAT, body)
        assert status == 200, answer
        assert answer["choices"][0]["message"]["content"].lstrip().startswith("{")
    a_tokens = {str(t): -100 for t, p in pieces.items() if p == b"a"}  # the grammar allows only these
    status, answer = await post(
        llama, "/v1/completions", {"model": "smol", "prompt": "x", "grammar": 'root ::= "a"', "logit_bias": a_tokens}
    )
    assert status == 200, answer
    assert answer["choices"][0]["text"] == "a"
    await chat_and_embeddings_served(llama)


@pytest.mark.engines
async def test_llama_vocabulary_and_context_bounds(llama: RemoteClient) -> None:
    status, body = await post(llama, CHAT, smol_chat(logit_bias={"49152": 5}))  # SmolLM2 has 49,152 tokens
    assert_refused(status, body, "logit_bias", "vocabulary")
    status, body = await post(llama, CHAT, smol_chat(repeat_last_n=513, repeat_penalty=1.1))  # context_size 512
    assert_refused(status, body, "repeat_last_n", "512")
    status, body = await post(llama, CHAT, smol_chat(repeat_last_n=512, repeat_penalty=1.1, top_k=2**31 - 1))
    assert status == 200, body
    await chat_and_embeddings_served(llama)


@pytest.mark.engines
async def test_llama_schema_the_converter_cannot_express_is_400_naming_it(llama: RemoteClient) -> None:
    cases = [
        # a part no grammar can express is named by its own path (grammar.py: check_schema_parts)
        ({"type": "object", "properties": {"x": {"$ref": "https://x.org/s.json"}}}, f"{FORMAT}.properties.x.$ref"),
        ({"type": "object", "properties": {"x": {"pattern": "(?!a)"}}}, f"{FORMAT}.properties.x.pattern"),
        ({"type": "object", "properties": []}, FORMAT),
        ({"type": 5}, FORMAT),
    ]
    for schema, param in cases:
        status, body = await post(llama, CHAT, smol_chat(response_format=json_schema_format(schema)))
        assert_refused(status, body, param, "reference" if param.endswith("$ref") else "grammar")
    await chat_and_embeddings_served(llama)
