"""Security: loopback by default, client-chosen names never reach the file system, no stack traces or engine
internals in responses, and the API key never in the logs."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml
from aiohttp import FormData
from aiohttp.test_utils import TestClient

from lllmsd.app import create_app
from lllmsd.config import DaemonConfig
from lllmsd.core.jobs import ChatJob, GenerationEvent
from lllmsd.core.store import ModelStore
from lllmsd.engines.base import ModelFiles
from lllmsd.engines.fake import FakeEngine
from tests.conftest import AppFactory, fake_model, make_config, sdk

SECRET = "hf_SECRETtoken0123456789"
API_KEY = "sk-lllmsd-test-KEY-0987654321"
HOSTILE_IDS = [
    "../../../../etc/passwd",
    "..",
    "/etc/passwd",
    "chat/../../chat",
    "..%2F..%2Fetc%2Fpasswd",
    "chat\x00.gguf",
    "chat\nINFO forged log line",
    "~root/.ssh/id_rsa",
    "C:\\Windows\\win.ini",
    "a" * 100_000,
]


class RecordingStore(ModelStore):
    """The real store, recording which model ids ever asked it for files."""

    def __init__(self, cache_dir: Path) -> None:
        super().__init__(cache_dir)
        self.asked: list[str] = []

    async def files(self, model_id: str, config: Any) -> ModelFiles:
        self.asked.append(model_id)
        return await super().files(model_id, config)

    def prefetch(self, model_id: str, config: Any) -> None:
        self.asked.append(model_id)
        super().prefetch(model_id, config)


@pytest.fixture
def store(tmp_path: Path) -> RecordingStore:
    return RecordingStore(tmp_path / "cache")


async def start_with_store(aiohttp_client: Any, config: DaemonConfig, store: ModelStore) -> TestClient:
    return await aiohttp_client(create_app(config, store=store, reap_interval=None))


# ---------------------------------------------------------------------------------- names and files


@pytest.mark.parametrize("model", HOSTILE_IDS, ids=lambda m: repr(m[:30]))
async def test_hostile_model_ids_are_404_and_never_touch_the_store(
    aiohttp_client: Any, store: RecordingStore, model: str
) -> None:
    config = make_config({"chat": fake_model(), "emb": {"task": "embedding", "engine": "fake"}})
    client = await start_with_store(aiohttp_client, config, store)
    requests = [
        ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "x"}]}),
        ("/v1/completions", {"model": model, "prompt": "x"}),
        ("/v1/embeddings", {"model": model, "input": "x"}),
    ]
    for path, body in requests:
        response = await client.post(path, json=body)
        assert response.status == 404
        error = (await response.json())["error"]
        assert error["code"] == "model_not_found"
        assert len(error["message"]) < 300  # an absurd id is not echoed back whole
    response = await client.get(f"/v1/models/{quote(model, safe='')}")
    assert response.status in (400, 404)
    assert set(store.asked) <= {"chat", "emb"}  # only configured ids ever reach the store


async def test_path_tricks_in_the_url_do_not_reach_other_routes_or_files(client: TestClient) -> None:
    for path in ("/v1/models/../../../etc/passwd", "/v1/models/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/../../etc/passwd"):
        response = await client.get(path)
        assert response.status == 404
        text = await response.text()
        assert "root:" not in text
        assert set((await response.json())["error"]) == {"message", "type", "param", "code"}


async def test_an_uploaded_file_name_is_never_used_as_a_path(start_app: AppFactory) -> None:
    client = await start_app(make_config({"stt": {"task": "speech-to-text", "engine": "fake"}}))
    data = FormData()
    data.add_field("model", "stt")
    data.add_field("file", b"", filename="../../../../tmp/evil/../secret.wav", content_type="audio/wav")
    response = await client.post("/v1/audio/transcriptions", data=data)
    assert response.status == 400
    message = (await response.json())["error"]["message"]
    assert "secret.wav" in message
    assert "/" not in message.split("'")[1]  # the name without its folders


# --------------------------------------------------------------------------- what responses reveal


class LeakyEngine(FakeEngine):
    """An engine library whose exception text carries a credential and a path, as real ones can."""

    def chat(self, job: ChatJob, cancel: threading.Event) -> Iterator[GenerationEvent]:
        raise RuntimeError(f"cannot read /home/alice/.cache/hf/token ({SECRET}): permission denied")


async def test_an_engine_exception_reaches_the_client_without_its_text(
    start_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    client = await start_app(engines={"fake": LeakyEngine})
    with caplog.at_level(logging.ERROR):
        for stream in (False, True):
            response = await client.post(
                "/v1/chat/completions",
                json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": stream},
            )
            assert response.status == 500
            text = await response.text()
            error = (await response.json())["error"]
            assert error["code"] == "engine_error"
            assert "RuntimeError" in error["message"]  # what kind of failure: safe, and useful
            for leaked in (SECRET, "/home/alice", "Traceback", 'File "'):
                assert leaked not in text
    assert SECRET in caplog.text  # the operator still gets the whole story, in the log
    assert "Traceback" in caplog.text


async def test_a_bug_answers_500_without_a_stack_trace(start_app: AppFactory) -> None:
    class Buggy(FakeEngine):
        @classmethod
        def check_job(cls, config: Any, job: Any) -> None:
            raise KeyError(f"internal state {SECRET}")

    client = await start_app(engines={"fake": Buggy})
    body = {"model": "chat", "messages": [{"role": "user", "content": "x"}]}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status == 500
    text = await response.text()
    assert SECRET not in text
    assert "Traceback" not in text
    assert "KeyError" not in text


# -------------------------------------------------------------------------------- API keys and logs


async def test_the_api_key_never_appears_in_logs(start_app: AppFactory, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        client = await start_app(make_config(api_keys=[API_KEY]))
        async with sdk(client, api_key=API_KEY) as api:
            answer = await api.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])
            assert answer.choices[0].message.content == "x"
        wrong = API_KEY[:-1] + "X"
        for headers in ({"Authorization": f"Bearer {wrong}"}, {"Authorization": API_KEY}, {}):
            response = await client.get("/v1/models", headers=headers)
            assert response.status == 401
            assert API_KEY not in await response.text()
            assert wrong not in await response.text()
        status = await client.get("/", headers={"Authorization": f"Bearer {API_KEY}"})
        assert API_KEY not in await status.text()
        document = await client.get("/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"})
        assert API_KEY not in await document.text()
    assert caplog.records  # the requests were logged...
    assert API_KEY not in caplog.text  # ...without the key
    assert wrong not in caplog.text
    assert "rejected an invalid API key" in caplog.text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on ``port`` (Linux /proc/net/tcp{,6})."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            next(handle)
            for line in handle:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(address)
    return found


def test_the_daemon_listens_on_loopback_by_default_and_never_logs_its_keys() -> None:
    """The real `lllmsd serve` process, at debug log level, with a key in the file and one in the environment."""
    port = free_port()
    env_key = "sk-from-environment-5555"
    with tempfile.TemporaryDirectory() as folder:
        config_path = Path(folder) / "config.yaml"
        config_path.write_text(
            yaml.safe_dump({"listen": {"port": port}, "api_keys": [API_KEY], "models": {"chat": fake_model()}})
        )
        log_path = Path(folder) / "daemon.log"
        lllmsd = Path(sys.executable).parent / "lllmsd"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [str(lllmsd), "serve", "-c", str(config_path), "--log-level", "debug"],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, "LLLMSD_API_KEYS": env_key},
            )
            try:
                _wait_listening(port, process)
                assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1 only
                for key in (API_KEY, env_key, "sk-wrong"):
                    _get(f"http://127.0.0.1:{port}/v1/models", key)
            finally:
                process.terminate()
                process.wait(30)
        log = log_path.read_text(errors="replace")
    assert "serving 1 models on http://127.0.0.1" in log
    assert "GET /v1/models" in log
    assert API_KEY not in log
    assert env_key not in log


def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, "the daemon exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError("the daemon never listened")


def _get(url: str, key: str) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
