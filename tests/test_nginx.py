"""Two `lllmsd serve` daemons on SmolLM2 behind a real nginx running the shipped deploy/nginx/lllmsd.conf
(tests/cluster.py): streams pass through token by token, a conversation's turns stay on one daemon and
hit its cache, and a daemon stopped with SIGTERM in the middle of the traffic costs no request.

Which daemon served a request is read from nginx's access log (the shipped JSON format); what each
daemon answered, from the daemon's own access log. Nothing here waits on the clock: each step waits for
an event (a notification, a chunk, a log line, a process exit).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import DaemonProcess, Nginx, http, nginx_binary
from tests.setup_models import model_path

pytestmark = pytest.mark.engines

MODEL = "smollm2"
# SmolLM2's end-of-text and end-of-turn tokens: banned where a test needs an answer of exactly max_tokens
NO_END = {"0": -100, "2": -100}


def daemon_config() -> dict[str, Any]:
    return {
        "concurrency": 2,
        "shutdown_grace": 120,
        "models": {
            MODEL: {
                "task": "text-completion",
                "engine": "llama-cpp",
                "location": str(model_path("smollm2")),
                "context_size": 2048,
                "min_instances": 1,
                "max_instances": 2,
                "device": {"threads": 1, "batch_threads": 1},  # ggml spin-waits: one thread on shared cores
            }
        },
    }


@dataclass
class Cluster:
    daemons: list[DaemonProcess]
    nginx: Nginx

    def by_address(self, address: str) -> DaemonProcess:
        return next(d for d in self.daemons if d.address == address)

    def chat(self, messages: list[dict[str, Any]], session: str | None = None, **extra: Any) -> Any:
        """A non-streamed chat through nginx: (status, headers, body, the access log entry)."""
        request_id = uuid.uuid4().hex
        headers = {"X-Request-Id": request_id, **({"X-Session-Id": session} if session else {})}
        body = {"model": MODEL, "messages": messages, "temperature": 0, **extra}
        status, response_headers, answer = http(self.nginx.url + "/v1/chat/completions", body, headers)
        return status, response_headers, answer, self.nginx.entry(request_id)

    def sessions_on(self, daemon: DaemonProcess, count: int, prefix: str) -> list[str]:
        """``count`` session ids that nginx hashes to ``daemon`` (found with GET /v1/models: no model work)."""
        found = []
        for n in itertools.count():
            session, request_id = f"{prefix}-{n}", uuid.uuid4().hex
            status, _, _ = http(
                self.nginx.url + "/v1/models", headers={"X-Session-Id": session, "X-Request-Id": request_id}
            )
            assert status == 200
            if self.nginx.entry(request_id)["upstream"] == daemon.address:
                found.append(session)
            if len(found) == count:
                return found
            assert n < 200, "consistent hashing sends nothing to this daemon"
        raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if nginx_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is missing: `make system-deps` installs nginx-light")
        pytest.skip("nginx is not installed (make system-deps installs nginx-light)")
    folder: Path = tmp_path_factory.mktemp("cluster")
    daemons: list[DaemonProcess] = []
    nginx: Nginx | None = None
    try:
        for name in ("one", "two"):
            daemons.append(DaemonProcess.start(folder / name, name, daemon_config()))
        for daemon in daemons:
            daemon.wait_ready()
        nginx = Nginx.start(folder / "nginx", [d.address for d in daemons])
        yield Cluster(daemons, nginx)
    finally:
        if nginx is not None:
            nginx.stop()
        for daemon in daemons:
            daemon.kill()


def running(daemon: DaemonProcess) -> float:
    """The daemon's lllmsd_num_requests_running for the model, from its /metrics."""
    with urllib.request.urlopen(daemon.url + "/metrics", timeout=60) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "lllmsd_num_requests_running" and sample.labels.get("model") == MODEL:
                return float(sample.value)
    raise AssertionError("no lllmsd_num_requests_running for the model")


def test_a_stream_arrives_through_nginx_token_by_token(cluster: Cluster) -> None:
    api = openai.OpenAI(base_url=cluster.nginx.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    raw = api.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count from one to one hundred in words."}],
        max_tokens=64,
        logit_bias=NO_END,  # type: ignore[arg-type]
        stream=True,
        extra_headers={"X-Session-Id": "stream-1"},
    )
    assert raw.headers["X-Session-Id"] == "stream-1"  # echoed through nginx
    chunks = iter(raw.parse())
    first = next(c for c in chunks if c.choices and c.choices[0].delta.content)
    assert first.choices[0].finish_reason is None
    # The first token is here, and a daemon is still generating the answer: nginx passed it on at once
    # rather than buffering the stream.
    assert sum(running(d) for d in cluster.daemons) == 1
    rest = list(chunks)
    tokens = [c for c in rest if c.choices and c.choices[0].delta.content]
    assert len(tokens) >= 32  # token by token (a few tokens are partial characters that come out joined)
    assert [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason] == ["length"]
    assert sum(running(d) for d in cluster.daemons) == 0


def test_each_conversation_stays_on_one_daemon_and_reuses_its_cache(cluster: Cluster) -> None:
    # a conversation hashed to each daemon, so both serve one
    home = {s: d.address for d in cluster.daemons for s in cluster.sessions_on(d, 1, f"conversation-{d.name}")}
    questions = ["Name a fruit.", "What colour is it?", "Name another one."]
    for session, address in home.items():
        messages: list[dict[str, Any]] = []
        served_by = set()
        for turn, question in enumerate(questions):
            messages.append({"role": "user", "content": question})
            status, headers, answer, entry = cluster.chat(messages, session, max_tokens=8)
            assert status == 200, answer
            assert headers["X-Session-Id"] == session
            served_by.add(entry["upstream"])
            cached = answer["usage"]["prompt_tokens_details"]["cached_tokens"]
            if turn > 0:  # the daemon, and its instance, held the conversation so far
                assert cached > 0, (session, turn, answer["usage"])
            messages.append(answer["choices"][0]["message"])
        assert served_by == {address}, session  # every turn on the daemon the session hashes to


def test_sigterm_to_one_daemon_costs_no_request(cluster: Cluster) -> None:
    stopping, staying = cluster.daemons
    # the traffic: non-streamed requests through nginx, half of them hashed to the daemon that stops
    sessions = cluster.sessions_on(stopping, 2, "drain") + cluster.sessions_on(staying, 2, "stay")
    results: list[tuple[int, Any]] = []
    answered = threading.Condition()
    enough = threading.Event()

    def client(offset: int) -> None:
        for n in itertools.count(offset, 2):
            messages = [{"role": "user", "content": f"Say a word about the number {n}."}]
            status, _, answer, _ = cluster.chat(messages, sessions[n % len(sessions)], max_tokens=6)
            with answered:
                results.append((status, answer))
                answered.notify_all()
            if enough.is_set():
                return

    # a long stream straight to the daemon that stops: it must run to its end while the daemon drains
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a long story."}],
        "max_tokens": 48,
        "logit_bias": NO_END,
        "stream": True,
    }
    connection = HTTPConnection("127.0.0.1", stopping.port, timeout=120)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    stream = connection.getresponse()
    assert stream.status == 200
    assert stream.readline().startswith(b"data: ")

    clients = [threading.Thread(target=client, args=(offset,)) for offset in range(2)]
    for thread in clients:
        thread.start()
    try:
        stopping.process.send_signal(signal.SIGTERM)
        assert stopping.next_notification()["STOPPING"] == "1"
        assert http(stopping.url + "/ready")[0] == 503  # out of rotation at once
        rest = stream.read().decode()
        assert rest.endswith("data: [DONE]\n\n")  # the running stream finished whole
        assert '"finish_reason":"length"' in rest
        assert stopping.process.wait(120) == 0
        with answered:  # more traffic once the daemon is gone
            target = len(results) + 4
            assert answered.wait_for(lambda: len(results) >= target, timeout=120)
    finally:
        enough.set()
        for thread in clients:
            thread.join(120)

    assert len(results) >= 4
    for status, answer in results:  # nothing lost, nothing failed
        assert status == 200, answer
        assert answer["choices"][0]["message"]["content"]
    # what the daemons themselves answered: the stopping one only 200 and, if nginx sent it any while it
    # drained (a matter of timing: the drain lasts as long as the one stream), 503
    chats = "/v1/chat/completions"
    assert 200 in {status for path, status in stopping.answers() if path == chats}
    assert {status for path, status in stopping.answers() if path == chats} <= {200, 503}
    assert {status for path, status in staying.answers() if path == chats} == {200}
    # nginx retried each refused request on the other daemon: "503, 200" when the daemon refused it while
    # draining, "502, 200" when the daemon had exited (nginx's own note of a connection refused, one per
    # "connect() failed" in its error log). Which of the two comes first is timing: requests the stopping
    # daemon admitted before SIGTERM wait behind the stream and are served, so the clients may send it
    # nothing new until it is gone. Either way, a request hashed to it after SIGTERM reached the other one.
    entries = [e for e in cluster.nginx.entries() if e["request"].startswith("POST")]
    assert {e["status"] for e in entries} == {200}
    retried = [e for e in entries if e["upstream_status"] in ("503, 200", "502, 200")]
    assert retried, [e["upstream_status"] for e in entries]
    assert all(e["upstream"] == f"{stopping.address}, {staying.address}" for e in retried)
    refused = sum(e["upstream_status"].split(", ").count("502") for e in entries)
    assert refused == (cluster.nginx.folder / "error.log").read_text().count("connect() failed")
