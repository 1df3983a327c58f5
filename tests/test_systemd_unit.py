"""systemd/lllmsd.service passes `systemd-analyze verify` with no warning, and its hardening scores "OK"
in `systemd-analyze security`. The unit runs /opt/lllmsd/bin/lllmsd, which verify wants to exist: the
test checks a copy pointed at this virtualenv's lllmsd (the only line that differs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "lllmsd.service"
INSTALLED_BINARY = "/opt/lllmsd/bin/lllmsd"


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    if shutil.which("systemd-analyze") is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing: `make system-deps` installs systemd")
        pytest.skip("systemd-analyze is not installed (make system-deps)")
    binary = Path(sys.executable).parent / "lllmsd"
    assert binary.exists(), binary
    text = UNIT.read_text()
    assert text.count(f"ExecStart={INSTALLED_BINARY} ") == 1
    copy = tmp_path / "lllmsd.service"  # verify names the unit after the file
    copy.write_text(text.replace(INSTALLED_BINARY, str(binary)))
    return copy


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=120, check=False)


def test_the_unit_verifies_without_warnings(unit_copy: Path) -> None:
    result = analyze("verify", "--man=no", str(unit_copy))
    # verify exits 0 on unknown keys or bad values and only warns: any output is a failure
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_a_broken_unit_is_caught(unit_copy: Path) -> None:
    unit_copy.write_text(unit_copy.read_text().replace("ProtectSystem=strict", "ProtectSystm=strict"))
    result = analyze("verify", "--man=no", str(unit_copy))
    assert "ProtectSystm" in result.stderr


def test_the_hardening_scores_ok(unit_copy: Path) -> None:
    # exposure is 0-100 here (the table shows it divided by ten); 20 = "OK" and better
    result = analyze("security", "--offline=true", "--threshold=20", "--no-pager", str(unit_copy))
    assert result.returncode == 0, result.stdout[-2000:]
    assert "Overall exposure level for lllmsd.service" in result.stdout


def test_the_unit_is_a_notify_service_that_reloads_with_sighup() -> None:
    settings = [line.strip() for line in UNIT.read_text().splitlines() if "=" in line and not line.startswith("#")]
    for wanted in (
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "DynamicUser=yes",
        "StateDirectory=lllmsd",
        "CacheDirectory=lllmsd",
        "ProtectSystem=strict",
        "Environment=XDG_CACHE_HOME=%C",
    ):
        assert wanted in settings, wanted
