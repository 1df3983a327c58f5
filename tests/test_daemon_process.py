"""`lllmsd serve` as a real process under a fake systemd: READY=1 once it listens, SIGHUP and
`lllmsd reload` re-read the config, SIGTERM sends STOPPING=1 and exits cleanly. The notifications are
also how the tests know when the daemon is ready or has reloaded: no sleeping."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from lllmsd.cli import main

FAKE = {"task": "text-completion", "engine": "fake"}
WAIT = 60  # seconds a notification may take before the test fails (a slow machine, not a timing assertion)


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    notify: socket.socket
    config: Path
    pid_file: Path
    url: str = ""

    def next_notification(self) -> dict[str, str]:
        datagram = self.notify.recv(4096).decode()
        return dict(line.split("=", 1) for line in datagram.split("\n"))

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=WAIT) as response:
            return json.loads(response.read())

    def models(self) -> list[str]:
        return [m["id"] for m in self.get("/v1/models")["data"]]

    def write_config(self, models: dict[str, Any]) -> None:
        self.config.write_text(yaml.safe_dump({"models": models}))

    def reloaded(self) -> str:
        """The STATUS of the READY=1 that ends the next reload."""
        assert self.next_notification()["RELOADING"] == "1"
        ready = self.next_notification()
        assert ready["READY"] == "1"
        return ready["STATUS"]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    name = f"lllmsd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind("\0" + name)
        notify.settimeout(WAIT)
        config = tmp_path / "models.yaml"
        config.write_text(yaml.safe_dump({"models": {"a": FAKE}}))
        pid_file = tmp_path / "lllmsd.pid"
        env = {**os.environ, "NOTIFY_SOCKET": "@" + name}
        env.pop("LLLMSD_API_KEYS", None)
        command = [
            sys.executable,
            "-m",
            "lllmsd",
            "serve",
            "-c",
            str(config),
            "--port",
            "0",
            "--pid-file",
            str(pid_file),
            "--log-level",
            "warning",
        ]
        with (tmp_path / "stderr.log").open("wb") as log:
            process = subprocess.Popen(command, env=env, stderr=log, cwd=tmp_path)
        daemon = Daemon(process, notify, config, pid_file)
        try:
            ready = daemon.next_notification()
            assert ready["READY"] == "1"
            match = re.search(r"http://127\.0\.0\.1:\d+", ready["STATUS"])
            assert match, ready
            daemon.url = match.group(0)
            yield daemon
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(WAIT)


def test_ready_once_listening_and_stopping_on_sigterm(daemon: Daemon) -> None:
    assert daemon.get("/health") == {"status": "ok"}  # READY=1 came after the socket listened
    assert daemon.pid_file.read_text().strip() == str(daemon.process.pid)
    daemon.process.send_signal(signal.SIGTERM)
    stopping = daemon.next_notification()
    assert stopping["STOPPING"] == "1"
    assert "stopping" in stopping["STATUS"]
    assert daemon.process.wait(WAIT) == 0
    assert not daemon.pid_file.exists()


def test_sighup_and_lllmsd_reload_reread_the_config(daemon: Daemon) -> None:
    assert daemon.models() == ["a"]

    daemon.write_config({"a": FAKE, "b": FAKE})
    daemon.process.send_signal(signal.SIGHUP)
    assert "added b" in daemon.reloaded()
    assert daemon.models() == ["a", "b"]

    # a bad file: refused by the daemon, which keeps serving the previous config
    daemon.config.write_text("models:\n  c: {task: text-completion, engine: nope}\n")
    result = CliRunner().invoke(main, ["reload", "--pid-file", str(daemon.pid_file)])
    assert result.exit_code == 0, result.output
    assert "reload refused" in daemon.reloaded()
    assert daemon.models() == ["a", "b"]

    # `lllmsd reload -c` checks the file first and does not signal the daemon when it is bad ...
    result = CliRunner().invoke(main, ["reload", "--pid", str(daemon.process.pid), "-c", str(daemon.config)])
    assert result.exit_code == 2
    assert "models.c.engine" in result.output
    # ... so the next notification is the reload of the fixed file, not a refusal
    daemon.write_config({"b": FAKE})
    result = CliRunner().invoke(main, ["reload", "--pid", str(daemon.process.pid), "-c", str(daemon.config)])
    assert result.exit_code == 0, result.output
    assert "removed a" in daemon.reloaded()
    assert daemon.models() == ["b"]


def test_reload_needs_a_running_daemon(tmp_path: Path) -> None:
    pid_file = tmp_path / "stale.pid"
    pid_file.write_text("not a pid\n")
    result = CliRunner().invoke(main, ["reload", "--pid-file", str(pid_file)])
    assert result.exit_code == 2
    assert "does not hold a process id" in result.output
    assert CliRunner().invoke(main, ["reload"]).exit_code == 2  # neither --pid nor --pid-file


def test_sigterm_drains_refusing_new_requests_and_finishing_a_running_stream(daemon: Daemon) -> None:
    daemon.write_config({"a": FAKE, "slow": {**FAKE, "token_delay": 0.05}})
    daemon.process.send_signal(signal.SIGHUP)
    assert "added slow" in daemon.reloaded()
    host, port = daemon.url.removeprefix("http://").split(":")
    words = " ".join(f"w{i}" for i in range(40))  # the fake engine answers them back, one a token_delay
    body = {"model": "slow", "messages": [{"role": "user", "content": words}], "stream": True}
    stream = http.client.HTTPConnection(host, int(port), timeout=WAIT)
    stream.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = stream.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # the stream is running

    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.next_notification()["STOPPING"] == "1"
    # draining: not ready, alive, and new requests refused with a 503 a balancer can retry elsewhere
    assert status_of(daemon.url + "/ready") == 503
    assert daemon.get("/health") == {"status": "ok"}
    refused = http.client.HTTPConnection(host, int(port), timeout=WAIT)
    refused.request(
        "POST", "/v1/chat/completions", json.dumps({**body, "stream": False}), {"Content-Type": "application/json"}
    )
    answer = refused.getresponse()
    assert answer.status == 503
    assert answer.getheader("Connection") == "close"
    assert json.loads(answer.read())["error"]["code"] == "shutting_down"

    rest = response.read().decode()  # the running stream finishes whole
    assert rest.endswith("data: [DONE]\n\n")
    assert '"finish_reason":"stop"' in rest
    assert daemon.process.wait(WAIT) == 0


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=WAIT) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
