"""sd_notify: the datagrams systemd would receive, on sockets the tests bind (path and abstract)."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lllmsd.notify import Notifier, socket_address


def fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)  # a missing datagram fails the test instead of hanging it
        yield sock, path


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    name = f"lllmsd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        yield sock, "@" + name


@pytest.mark.parametrize("which", ["path_socket", "abstract_socket"])
def test_ready_stopping_status_and_reloading(which: str, request: pytest.FixtureRequest) -> None:
    sock, address = request.getfixturevalue(which)
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    assert notifier.ready("serving 2 models")
    assert fields(sock.recv(4096)) == {"READY": "1", "STATUS": "serving 2 models"}
    assert notifier.reloading()
    reloading = fields(sock.recv(4096))
    assert reloading["RELOADING"] == "1"
    assert int(reloading["MONOTONIC_USEC"]) > 0
    assert notifier.status("line one\nline two")
    assert fields(sock.recv(4096)) == {"STATUS": "line one line two"}  # a newline would start a new field
    assert notifier.stopping("bye")
    assert fields(sock.recv(4096)) == {"STOPPING": "1", "STATUS": "bye"}


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready("x")


def test_a_vanished_socket_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with caplog.at_level(logging.WARNING):
        assert not notifier.ready("x")
    assert "cannot notify systemd" in caplog.text


def test_addresses() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abstract") == "\0abstract"
    assert socket_address("vsock:2:1234") is None


def test_a_socket_kind_we_do_not_speak_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        notifier = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert "vsock:2:1234" in caplog.text


def test_the_environment_is_read_by_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "sock"))
    assert Notifier().address == str(tmp_path / "sock")
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert "NOTIFY_SOCKET" not in os.environ
    assert not Notifier().enabled
