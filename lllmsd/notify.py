"""systemd's service notification protocol (sd_notify), for ``Type=notify`` units.

The protocol is one datagram of ``KEY=VALUE`` lines sent to the unix socket named by ``$NOTIFY_SOCKET``
(a path, or ``@name`` for the abstract namespace). It is a few lines, so it is written here rather than
taken from a library: ``sdnotify`` has not changed since 2017 and ``systemd-python`` needs libsystemd's
headers to build. Without ``$NOTIFY_SOCKET`` (not started by systemd) every call does nothing.

A failure to notify is logged and never raised: a daemon must not die because its supervisor's socket
went away.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

ENV_VAR = "NOTIFY_SOCKET"


def socket_address(value: str) -> str | None:
    """The address to send to, from ``$NOTIFY_SOCKET``; None for a kind we do not speak (vsock)."""
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """Sends state changes to systemd. Built once from the environment (injected in tests)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        value = (environ if environ is not None else os.environ).get(ENV_VAR, "")
        self.address = socket_address(value) if value else None
        if value and self.address is None:
            log.warning("%s=%r is not a unix socket address; systemd will not be notified", ENV_VAR, value)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` lines (``ready=1`` → ``READY=1``); True if the datagram went out."""
        if self.address is None:
            return False
        message = "\n".join(f"{key.upper()}={_one_line(value)}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall(message.encode())
        except OSError as exc:
            log.warning("cannot notify systemd (%s): %s", message.replace("\n", " "), exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(ready=1, status=status)

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd ≥ 253 (Type=notify-reload) tie the READY=1 that follows to this reload
        return self.send(reloading=1, monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str) -> bool:
        return self.send(stopping=1, status=status)

    def status(self, status: str) -> bool:
        return self.send(status=status)


def _one_line(value: str | int) -> str:
    # a newline inside a value would start a new KEY=VALUE line
    return str(value).replace("\n", " ")
