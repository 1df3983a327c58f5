"""LangChain (langchain-openai) against the daemon: ChatOpenAI and OpenAIEmbeddings as their users
write them, with only ``base_url`` and ``api_key`` set."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import openai
import pytest
from aiohttp.test_utils import TestClient
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI, OpenAIEmbeddings

from tests.clients.conftest import KEY, base_url
from tests.clients.models import PERSON_PROMPT, Person, check_person
from tests.conftest import sdk


def chat_model(client: TestClient, model: str = "chat", **options: object) -> ChatOpenAI:
    return ChatOpenAI(model=model, base_url=base_url(client), api_key=KEY, max_retries=0, **options)


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


async def test_invoke_stream_batch_sync_and_async(fake_daemon: TestClient) -> None:
    llm = chat_model(fake_daemon)
    answer = await asyncio.to_thread(llm.invoke, "hello there")
    assert isinstance(answer, AIMessage)
    assert answer.content == "hello there"  # the fake answers the user's words
    assert answer.usage_metadata is not None
    assert answer.usage_metadata["output_tokens"] == 2
    assert (await llm.ainvoke("good morning")).content == "good morning"
    chunks = await asyncio.to_thread(lambda: list(llm.stream("one two three")))
    assert "".join(str(c.content) for c in chunks) == "one two three"
    async_chunks = [c async for c in llm.astream("four five")]
    assert "".join(str(c.content) for c in async_chunks) == "four five"
    batch = await asyncio.to_thread(llm.batch, ["first", "second words", "third"])
    assert [m.content for m in batch] == ["first", "second words", "third"]
    assert [m.content for m in await llm.abatch(["x y", "z"])] == ["x y", "z"]


async def test_bind_tools_and_send_the_result_back(fake_daemon: TestClient) -> None:
    llm = chat_model(fake_daemon).bind_tools([get_weather])
    question = HumanMessage("what is get_weather in Paris")  # the fake calls a tool its message names
    answer = await llm.ainvoke([question])
    assert answer.tool_calls
    call = answer.tool_calls[0]
    assert call["name"] == "get_weather"
    assert call["args"] == {"text": question.content}  # the fake's arguments
    result = ToolMessage(content="sunny", tool_call_id=call["id"])
    follow_up = await chat_model(fake_daemon).ainvoke([question, answer, result, HumanMessage("thanks")])
    assert follow_up.content == "thanks"


@pytest.mark.engines
async def test_structured_output_on_a_nested_model_with_each_method(smol_daemon: TestClient) -> None:
    llm = chat_model(smol_daemon, "smol", temperature=0, max_tokens=160)
    for method in ("json_schema", "function_calling"):  # the schema is on the wire: the grammar holds to it
        person = await llm.with_structured_output(Person, method=method).ainvoke(PERSON_PROMPT)
        check_person(person)
    # json_mode asks for any JSON object and puts no schema on the wire: the grammar guarantees an object,
    # whether a 135M model writes the right keys, or finishes within max_tokens, is up to the model
    json_mode = chat_model(smol_daemon, "smol", temperature=0, max_tokens=40)
    try:
        result = await json_mode.with_structured_output(Person, method="json_mode", include_raw=True).ainvoke(
            PERSON_PROMPT
        )
        text = str(result["raw"].content)
        assert isinstance(json.loads(text), dict)
    except openai.LengthFinishReasonError as cut:
        text = str(cut.completion.choices[0].message.content)
    assert text.startswith("{")


async def test_embeddings_with_their_defaults_send_token_ids(fake_daemon: TestClient) -> None:
    # OpenAIEmbeddings tokenizes with tiktoken (cl100k_base) and sends the ids: the daemon decodes them,
    # so the vectors are those of the texts themselves
    embeddings = OpenAIEmbeddings(model="emb", base_url=base_url(fake_daemon), api_key=KEY, max_retries=0)
    texts = ["a cat sat on the mat", "hello world"]
    vectors = await asyncio.to_thread(embeddings.embed_documents, texts)
    query = await embeddings.aembed_query("a cat sat on the mat")
    async with sdk(fake_daemon) as api:
        direct = await api.embeddings.create(model="emb", input=texts, encoding_format="float")
    np.testing.assert_allclose(vectors, [d.embedding for d in direct.data], rtol=1e-5)
    np.testing.assert_allclose(query, direct.data[0].embedding, rtol=1e-5)


@pytest.mark.engines
async def test_cl100k_ids_embed_like_their_text_on_a_real_model(minilm_daemon: TestClient) -> None:
    import tiktoken

    ids = tiktoken.get_encoding("cl100k_base").encode("a cat sat on the mat")
    async with sdk(minilm_daemon) as api:
        from_ids = await api.embeddings.create(model="minilm", input=ids, encoding_format="float")
        from_text = await api.embeddings.create(model="minilm", input="a cat sat on the mat", encoding_format="float")
        other = await api.embeddings.create(model="minilm", input="stock markets fell sharply", encoding_format="float")
    a, b, c = (np.asarray(x.data[0].embedding) for x in (from_ids, from_text, other))

    def cosine(x: np.ndarray, y: np.ndarray) -> float:
        return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))

    assert cosine(a, b) > 0.99
    assert cosine(a, c) < 0.5  # the check can fail: unrelated text is far
    langchain = OpenAIEmbeddings(model="minilm", base_url=base_url(minilm_daemon), api_key=KEY, max_retries=0)
    assert cosine(np.asarray(await langchain.aembed_query("a cat sat on the mat")), b) > 0.99
