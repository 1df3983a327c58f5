"""`lllmsd pull`, `lllmsd ls` and `lllmsd rm` against the local fake Hub (HF_ENDPOINT)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from lllmsd.cli import main
from tests.hubserver import FakeHub, files_under, payload, start_hub

SIZE = 16 * 1024


@pytest.fixture
async def hub(aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    hub, endpoint = await start_hub(aiohttp_server, monkeypatch)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    yield hub
    hub.release_all()


def write_config(tmp_path: Path, models: dict[str, Any]) -> Path:
    path = tmp_path / "models.yaml"
    full = {name: {"engine": "fake", "task": "text-completion", **m} for name, m in models.items()}
    path.write_text(yaml.safe_dump({"cache_dir": str(tmp_path / "cache"), "models": full}))
    return path


async def run(*args: str) -> Result:
    # the fake hub answers on this event loop: the command runs in a thread, as a separate process would
    return await asyncio.to_thread(CliRunner().invoke, main, list(args))


async def test_pull_ls_rm(hub: FakeHub, tmp_path: Path) -> None:
    gguf = hub.add("org/m", "m.gguf", payload(SIZE))
    hub.add("org/st", "config.json", b"{}")
    hub.add("org/st", "model.safetensors", payload(SIZE, "st"))
    local = tmp_path / "local.gguf"
    local.write_bytes(b"mine")
    config = write_config(
        tmp_path,
        {
            "chat": {"repo": "org/m", "file": "m.gguf", "sha256": gguf.sha256},
            "emb": {"repo": "org/st", "allow_patterns": ["*.json", "*.safetensors"]},
            "local": {"location": "local.gguf"},
            "bare": {},
        },
    )

    listed = await run("ls", "-c", str(config))
    assert listed.exit_code == 0, listed.output
    rows = {line.split()[0]: line.split() for line in listed.output.splitlines()[1:]}
    assert rows["chat"][2:4] == ["org/m/m.gguf@main", "missing"]
    assert rows["local"][2:5] == ["location", "local.gguf", "local"]  # relative to the config, and there
    assert rows["bare"][-3:] == ["weights", "none", "-"]

    pulled = await run("pull", "-c", str(config), "chat", "emb")
    assert pulled.exit_code == 0, pulled.output
    assert "chat: " in pulled.output
    assert "m.gguf: 100%" in pulled.stderr  # a progress bar per file, on stderr
    assert "model.safetensors: 100%" in pulled.stderr
    assert len(hub.gets("m.gguf")) == 1
    assert len(files_under(tmp_path / "cache", "model.safetensors")) == 1

    listed = await run("ls", "-c", str(config))
    rows = {line.split()[0]: line.split() for line in listed.output.splitlines()[1:]}
    assert rows["chat"][3:] == ["cached", "16.0", "KiB"]
    assert rows["emb"][-3:] == ["cached", "16.0", "KiB"]

    removed = await run("rm", "-c", str(config), "chat")
    assert removed.exit_code == 0, removed.output
    assert "chat: removed, 16.0 KiB freed" in removed.output
    assert not files_under(tmp_path / "cache", "m.gguf")
    assert len(files_under(tmp_path / "cache", "model.safetensors")) == 1  # the other model is untouched
    listed = await run("ls", "-c", str(config))
    assert {line.split()[0]: line.split() for line in listed.output.splitlines()[1:]}["chat"][3] == "missing"

    refused = await run("rm", "-c", str(config), "local")
    assert refused.exit_code == 1
    assert "never deletes local files" in refused.output
    assert local.read_bytes() == b"mine"


async def test_pull_reports_a_failure_with_exit_code_1(hub: FakeHub, tmp_path: Path) -> None:
    bad = hub.add("org/m", "m.gguf", payload(SIZE))
    bad.corrupt = True
    config = write_config(tmp_path, {"chat": {"repo": "org/m", "file": "m.gguf", "sha256": bad.sha256}})
    result = await run("pull", "-c", str(config))
    assert result.exit_code == 1
    assert f"chat: failed: model 'chat' is unavailable: m.gguf failed verification: expected sha256 {bad.sha256}" in (
        result.output
    )


async def test_unknown_models_and_bad_configs_exit_2(hub: FakeHub, tmp_path: Path) -> None:
    config = write_config(tmp_path, {"chat": {"repo": "org/m", "file": "m.gguf"}})
    assert (await run("pull", "-c", str(config), "nope")).exit_code == 2
    assert (await run("rm", "-c", str(config), "nope")).exit_code == 2
    traversal = write_config(tmp_path, {"chat": {"repo": "org/m", "file": "../../etc/passwd"}})
    result = await run("pull", "-c", str(traversal))
    assert result.exit_code == 2
    assert "models.chat.file" in result.output
    assert not hub.requests
