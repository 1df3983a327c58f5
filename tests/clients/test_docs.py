"""Every Python snippet of docs/clients.md runs as written, against a live daemon with the models it names
(SmolLM2 as "smollm2"; a fake embedding model as "minilm": the vectors do not matter here), only the
address changed to the test server's."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clients.conftest import smollm2
from tests.conftest import make_config
from tests.shared_daemon import ThreadedDaemon, shared_daemon

DOC = Path(__file__).resolve().parents[2] / "docs" / "clients.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
DOCUMENTED_URL = "http://localhost:3000/v1"


@pytest.fixture(scope="module")
def documented_daemon() -> Iterator[ThreadedDaemon]:
    """One daemon for every snippet: each runs as a user would against the same server."""
    models = {"smollm2": smollm2(), "minilm": {"task": "embedding", "engine": "fake", "dimensions": 8}}
    with shared_daemon(make_config(models)) as daemon:
        yield daemon


def test_the_page_has_a_snippet_per_library() -> None:
    assert len(SNIPPETS) == 4
    for library in ("from openai import", "from langchain_openai import", "from llama_index", "import litellm"):
        assert any(library in snippet for snippet in SNIPPETS), library
    assert all(DOCUMENTED_URL in snippet for snippet in SNIPPETS)


@pytest.mark.engines
@pytest.mark.parametrize("snippet", SNIPPETS, ids=["openai", "langchain", "llama-index", "litellm"])
async def test_each_snippet_runs(documented_daemon: ThreadedDaemon, snippet: str) -> None:
    code = snippet.replace(DOCUMENTED_URL, str(documented_daemon.url / "v1"))
    printed = io.StringIO()

    def run() -> None:
        with contextlib.redirect_stdout(printed):
            exec(compile(code, str(DOC), "exec"), {"__name__": "snippet"})

    await asyncio.to_thread(run)
    lines = printed.getvalue().splitlines()
    assert len(lines) == snippet.count("print(")
    assert all(line.strip() for line in lines)
