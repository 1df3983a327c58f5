"""Real `lllmsd serve` processes and a real nginx in front of them, on loopback ports: for
tests/test_nginx.py and bench/scale_out.py.

nginx runs the shipped deploy/nginx/lllmsd.conf: ``nginx_site`` changes only the upstream's ``server``
lines, the ``listen`` port and the access log's path (and, for the round-robin comparison of the bench,
drops the ``hash`` line), and a minimal nginx.conf around it keeps every file nginx writes in one folder.
The daemons tell when they listen through a notify socket of their own (as systemd would); ``/ready``
tells when their models are loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_NGINX_CONF = ROOT / "deploy" / "nginx" / "lllmsd.conf"
WAIT = 120.0  # seconds a start may take on a loaded machine (not a timing assertion)

_UPSTREAM_SERVER = re.compile(r"^(?P<indent>[ \t]*)server 127\.0\.0\.1:\d+(?P<options>[^;\n]*);\n", re.MULTILINE)
_LISTEN = re.compile(r"^(?P<indent>[ \t]*)listen 8080;$", re.MULTILINE)
_HASH = re.compile(r"^[ \t]*hash \$lllmsd_affinity_key consistent;\n", re.MULTILINE)
_LOG_PATH = "/var/log/nginx/lllmsd.access.log"


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def http(
    url: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None, timeout: float = WAIT
) -> tuple[int, dict[str, str], Any]:
    """One request: its status, headers and JSON body (the error envelope for a 4xx/5xx)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read() or b"null")


# ------------------------------------------------------------------------------------------ daemons


@dataclass
class DaemonProcess:
    """`lllmsd serve` in a child process, on a port of its own."""

    name: str
    process: subprocess.Popen[bytes]
    notify: socket.socket
    log: Path
    url: str = ""

    @classmethod
    def start(cls, folder: Path, name: str, config: dict[str, Any]) -> DaemonProcess:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        address = f"lllmsd-{name}-{uuid.uuid4().hex}"
        notify.bind("\0" + address)
        notify.settimeout(WAIT)
        env = {**os.environ, "NOTIFY_SOCKET": "@" + address}
        env.pop("LLLMSD_API_KEYS", None)
        command = [sys.executable, "-m", "lllmsd", "serve", "-c", "config.yaml", "--port", "0", "--log-level", "info"]
        log = folder / "daemon.log"
        with log.open("wb") as out:
            process = subprocess.Popen(command, env=env, stderr=out, stdout=out, cwd=folder)
        daemon = cls(name, process, notify, log)
        try:
            ready = daemon.next_notification()
            match = re.search(r"http://127\.0\.0\.1:\d+", ready.get("STATUS", ""))
            if ready.get("READY") != "1" or match is None:
                raise RuntimeError(f"{name}: unexpected notification {ready}")
            daemon.url = match.group(0)
        except BaseException:
            daemon.kill()
            raise
        return daemon

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def next_notification(self) -> dict[str, str]:
        datagram = self.notify.recv(4096).decode()
        return dict(line.split("=", 1) for line in datagram.split("\n") if "=" in line)

    def wait_ready(self, timeout: float = WAIT) -> None:
        """Until GET /ready answers 200: its models are loaded (what an orchestrator's probe waits for)."""
        deadline = time.monotonic() + timeout
        while http(self.url + "/ready")[0] != 200:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} never became ready; its log:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def answers(self) -> list[tuple[str, int]]:
        """(path, status) of every request the daemon logged (its access log lines, in order)."""
        lines = re.findall(r"lllmsd\.access: \w+ (\S+) model=\S+ status=(\d+) ", self.log.read_text())
        return [(path, int(status)) for path, status in lines]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(WAIT)
        self.notify.close()

    def terminate(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(WAIT)
        self.notify.close()
        return code


# ------------------------------------------------------------------------------------------- nginx


def nginx_site(upstreams: list[str], port: int, access_log: Path, *, balance: str = "hash") -> str:
    """The shipped site config, pointed at ``upstreams`` (host:port) and listening on ``port``.
    ``balance="round-robin"`` drops the hash line (nginx's default balancing): the bench's comparison."""
    text = SHIPPED_NGINX_CONF.read_text()
    servers = list(_UPSTREAM_SERVER.finditer(text))
    assert len(servers) == 2, "the shipped config lists two example daemons"
    first, second = servers
    lines = "".join(f"{first['indent']}server {u}{first['options']};\n" for u in upstreams)
    text = text[: first.start()] + lines + text[first.end() : second.start()] + text[second.end() :]
    text, listens = _LISTEN.subn(rf"\g<indent>listen 127.0.0.1:{port};", text)
    assert listens == 1
    assert text.count(_LOG_PATH) == 1
    text = text.replace(_LOG_PATH, str(access_log))
    if balance == "round-robin":
        text, hashes = _HASH.subn("", text)
        assert hashes == 1
    return text


def nginx_main_config(folder: Path, site: Path) -> str:
    """A minimal nginx.conf that keeps every file nginx writes in ``folder`` and includes ``site``."""
    user = "user root root;\n" if os.geteuid() == 0 else ""  # workers can then read the test's own folders
    temp = "\n".join(
        f"    {kind}_temp_path {folder / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"{user}daemon off;\nworker_processes 1;\npid {folder / 'nginx.pid'};\n"
        f"error_log {folder / 'error.log'} notice;\n"
        "events { worker_connections 512; }\n"
        f"http {{\n{temp}\n    include {site};\n}}\n"
    )


@dataclass
class Nginx:
    process: subprocess.Popen[bytes]
    folder: Path
    port: int
    access_log: Path
    url: str = field(init=False)

    def __post_init__(self) -> None:
        self.url = f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, folder: Path, upstreams: list[str], *, balance: str = "hash") -> Nginx:
        binary = nginx_binary()
        if binary is None:
            raise FileNotFoundError("nginx is not installed (make system-deps installs nginx-light)")
        folder.mkdir(parents=True, exist_ok=True)
        port = free_port()
        access_log = folder / "access.log"
        site = folder / "lllmsd.conf"
        site.write_text(nginx_site(upstreams, port, access_log, balance=balance))
        main = folder / "nginx.conf"
        main.write_text(nginx_main_config(folder, site))
        command = [binary, "-p", str(folder), "-c", str(main)]
        checked = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=WAIT, check=False)
        if checked.returncode != 0:
            raise RuntimeError(f"nginx -t refused the config:\n{checked.stderr}")
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        nginx = cls(process, folder, port, access_log)
        deadline = time.monotonic() + WAIT
        while not _accepts(port):
            if process.poll() is not None or time.monotonic() > deadline:
                nginx.stop()
                raise RuntimeError(f"nginx did not start:\n{(folder / 'error.log').read_text()[-3000:]}")
            time.sleep(0.05)
        return nginx

    def entries(self) -> list[dict[str, Any]]:
        """The access log: one dict per request (the shipped JSON log format)."""
        if not self.access_log.exists():
            return []
        return [json.loads(line) for line in self.access_log.read_text().splitlines() if line.strip()]

    def entry(self, request_id: str) -> dict[str, Any]:
        """The log entry of one request. nginx writes it after the response's last byte went out, so a
        client can see its answer a moment before the line: wait for it."""
        deadline = time.monotonic() + 30
        while not (found := [e for e in self.entries() if e["request_id"] == request_id]):
            assert time.monotonic() < deadline, f"no access log entry for request {request_id}"
            time.sleep(0.01)
        assert len(found) == 1, (request_id, found)
        return found[0]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: finishes what it passes on
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(WAIT)


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0
