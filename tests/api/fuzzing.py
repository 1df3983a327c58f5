"""Fuzzing the daemon with schemathesis against its own /openapi.json (used by test_fuzz.py and bench/fuzz.py).

The daemon runs for real, in a thread with its own event loop, on a loopback port, with the same
runner settings `lllmsd serve` uses; schemathesis sends generated requests to it over HTTP (aiohttp is
neither ASGI nor WSGI). For every operation and both kinds of data (positive: valid by the schema;
negative: invalid), each response must be: not a 5xx, a status the document lists, a content type it
lists, a body that validates against the documented schema, and a 4xx for invalid data; and it must
come within ``REQUEST_TIMEOUT`` (no hang).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import hypothesis
import requests
import schemathesis
from aiohttp import web
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from lllmsd.app import create_app
from lllmsd.config import DaemonConfig
from lllmsd.server import protocol_options

REQUEST_TIMEOUT = 30.0  # seconds: a request that takes longer counts as a hang
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
MODES = {"positive": GenerationMode.POSITIVE, "negative": GenerationMode.NEGATIVE}

CaseEdit = Callable[[Any], None]


class DaemonThread:
    """The whole daemon, served from a background thread until ``close()``."""

    def __init__(self, config: DaemonConfig, engines: dict[str, type] | None = None) -> None:
        self.config = config
        self.engines = engines
        self.url = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fuzzed-daemon", daemon=True)

    def __enter__(self) -> DaemonThread:
        self._thread.start()
        if not self._ready.wait(60) or self._error is not None:
            raise RuntimeError(f"the daemon did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to __enter__
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = create_app(self.config, engines=self.engines)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, **protocol_options(self.config))
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            host, port = runner.addresses[0][:2]
            self.url = f"http://{host}:{port}"
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()


@dataclass
class Finding:
    operation: str
    mode: str
    error: str


def load_schema(url: str) -> Any:
    document = requests.get(f"{url}/openapi.json", timeout=REQUEST_TIMEOUT).json()
    return schemathesis.openapi.from_dict(document)


def operations(schema: Any, prefixes: tuple[str, ...] = ("/v1", "/openai/v1", "/")) -> Iterator[Any]:
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path.startswith(prefixes):
            yield operation


def _with_model(model_ids: list[str], edit: CaseEdit | None, mode: str) -> Callable[[tuple[Any, str | None]], Any]:
    """Most cases name a configured model (else nearly every request is a 404); some keep their own."""

    def apply(drawn: tuple[Any, str | None]) -> Any:
        case, model = drawn
        current = case.body.get("model") if isinstance(case.body, dict) else None
        # in negative data, an empty or non-string model may be the very thing that makes it invalid
        if model is not None and isinstance(current, str) and (current or mode == "positive"):
            case.body["model"] = model
        if edit is not None:
            edit(case)
        return case

    return apply


def fuzz_operation(
    operation: Any,
    url: str,
    mode: str,
    *,
    max_examples: int,
    model_ids: list[str],
    edit: CaseEdit | None = None,
    seed: int | None = 0,
) -> list[Finding]:
    """Send ``max_examples`` generated requests to one operation; the failures found (none is good)."""
    findings: list[Finding] = []
    if mode == "negative" and not operation.body:
        return findings  # no body, and the only parameter (a model id) takes any string: nothing is invalid
    # A multipart form field is text on the wire: "false" is a valid prompt however it was generated, so
    # "invalid data must be refused" only applies to JSON bodies.
    rejects = mode == "negative" and not _is_multipart(operation)
    checks = CHECKS + ([negative_data_rejection] if rejects else [])
    strategy = st.tuples(operation.as_strategy(generation_mode=MODES[mode]), st.sampled_from([*model_ids, None]))
    session = requests.Session()

    @hypothesis.settings(
        max_examples=max_examples,
        deadline=None,
        database=None,  # no example database written into the checkout
        derandomize=seed is not None,
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.generate],  # report every failure found, do not spend time shrinking
    )
    @hypothesis.given(strategy.map(_with_model(model_ids, edit, mode)))
    def run(case: Any) -> None:
        try:
            case.call_and_validate(base_url=url, session=session, checks=checks, timeout=REQUEST_TIMEOUT)
        except requests.Timeout:
            findings.append(Finding(operation.label, mode, f"no answer within {REQUEST_TIMEOUT}s: {_describe(case)}"))
        except (AssertionError, FailureGroup) as exc:  # the checks that failed, for this case
            findings.append(Finding(operation.label, mode, f"{exc}\n{_describe(case)}"[:3000]))

    with contextlib.closing(session):
        run()
    return findings


def _is_multipart(operation: Any) -> bool:
    return any(body.media_type.startswith("multipart/") for body in operation.body)


def _describe(case: Any) -> str:
    body = repr(case.body)
    return f"{case.method} {case.formatted_path} body={body[:500]}"
