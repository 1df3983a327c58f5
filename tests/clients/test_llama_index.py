"""LlamaIndex against the daemon: OpenAILike (chat, stream, structured_predict) and OpenAILikeEmbedding,
configured as their documentation says for an OpenAI-compatible server."""

from __future__ import annotations

import numpy as np
import pytest
from aiohttp.test_utils import TestClient
from llama_index.core.llms import ChatMessage
from llama_index.core.prompts import PromptTemplate
from llama_index.embeddings.openai_like import OpenAILikeEmbedding
from llama_index.llms.openai_like import OpenAILike

from tests.clients.conftest import KEY, base_url
from tests.clients.models import PERSON_PROMPT, Person, check_person
from tests.conftest import sdk


def llm(client: TestClient, model: str = "chat", **options: object) -> OpenAILike:
    return OpenAILike(
        model=model,
        api_base=base_url(client),
        api_key=KEY,
        is_chat_model=True,
        is_function_calling_model=True,
        context_window=2048,
        max_retries=0,
        **options,
    )


async def test_chat_and_stream_sync_and_async(fake_daemon: TestClient) -> None:
    model = llm(fake_daemon)
    answer = await model.achat([ChatMessage(role="user", content="hello from llama index")])
    assert answer.message.content == "hello from llama index"
    streamed = [chunk.delta async for chunk in await model.astream_chat([ChatMessage(role="user", content="a b c")])]
    assert "".join(d or "" for d in streamed) == "a b c"
    completed = await model.acomplete("plain completion words")
    assert completed.text == "plain completion words"


@pytest.mark.engines
async def test_structured_predict_on_a_nested_model(smol_daemon: TestClient) -> None:
    model = llm(smol_daemon, "smol", temperature=0, max_tokens=160)
    person = await model.astructured_predict(Person, PromptTemplate("{text}"), text=PERSON_PROMPT)
    check_person(person)


async def test_embeddings(fake_daemon: TestClient) -> None:
    embed = OpenAILikeEmbedding(model_name="emb", api_base=base_url(fake_daemon), api_key=KEY, max_retries=0)
    texts = ["the first text", "and the second"]
    vectors = await embed.aget_text_embedding_batch(texts)
    query = await embed.aget_query_embedding("the first text")
    async with sdk(fake_daemon) as api:
        direct = await api.embeddings.create(model="emb", input=texts, encoding_format="float")
    np.testing.assert_allclose(vectors, [d.embedding for d in direct.data], rtol=1e-5)
    np.testing.assert_allclose(query, direct.data[0].embedding, rtol=1e-5)
