"""Every Python snippet of docs/clients.md runs as written, against a live daemon with the models it names
(SmolLM2 as "smollm2"; a fake embedding model as "minilm": the vectors do not matter here), only the
address changed to the test server's."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from tests.clients.conftest import base_url, smollm2
from tests.conftest import AppFactory, make_config

DOC = Path(__file__).resolve().parents[2] / "docs" / "clients.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
DOCUMENTED_URL = "http://localhost:3000/v1"


@pytest.fixture
async def documented_daemon(start_app: AppFactory) -> TestClient:
    models = {"smollm2": smollm2(), "minilm": {"task": "embedding", "engine": "fake", "dimensions": 8}}
    return await start_app(make_config(models))


def test_the_page_has_a_snippet_per_library() -> None:
    assert len(SNIPPETS) == 4
    for library in ("from openai import", "from langchain_openai import", "from llama_index", "import litellm"):
        assert any(library in snippet for snippet in SNIPPETS), library
    assert all(DOCUMENTED_URL in snippet for snippet in SNIPPETS)


@pytest.mark.engines
@pytest.mark.parametrize("snippet", SNIPPETS, ids=["openai", "langchain", "llama-index", "litellm"])
async def test_each_snippet_runs(documented_daemon: TestClient, snippet: str) -> None:
    code = snippet.replace(DOCUMENTED_URL, base_url(documented_daemon))
    printed = io.StringIO()

    def run() -> None:
        with contextlib.redirect_stdout(printed):
            exec(compile(code, str(DOC), "exec"), {"__name__": "snippet"})

    await asyncio.to_thread(run)
    lines = printed.getvalue().splitlines()
    assert len(lines) == snippet.count("print(")
    assert all(line.strip() for line in lines)
