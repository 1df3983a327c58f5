"""Both shipped configs pass `lllmsd config check`: the offline one (packaged models) and the Hub one,
which must validate without downloading anything, serving the same models by Hub URL or repo."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from lllmsd.cli import main
from lllmsd.config import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["config.example.yaml", "config.hub.yaml"])
def test_lllmsd_config_check_passes(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a check that tried the network would fail here
    result = CliRunner().invoke(main, ["config", "check", "-c", str(ROOT / name)])
    assert result.exit_code == 0, result.output
    assert "ok (4 models: smollm2, minilm, whisper-tiny-en, piper-joe)" in result.output


def test_the_hub_config_serves_the_same_models_from_the_hub() -> None:
    offline = load_config(ROOT / "config.example.yaml", environ={})
    hub = load_config(ROOT / "config.hub.yaml", environ={})
    assert list(hub.models) == list(offline.models)
    for model_id, model in hub.models.items():
        local = offline.models[model_id]
        assert (model.engine, model.task) == (local.engine, local.task)
        assert model.location is None
        assert model.url is not None or model.repo is not None, model_id
    assert hub.models["smollm2"].url.startswith("https://huggingface.co/")  # type: ignore[union-attr]
    assert hub.models["minilm"].repo == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub.models["whisper-tiny-en"].repo == "Systran/faster-whisper-tiny.en"


def test_the_hub_config_keeps_its_example_key_commented_out() -> None:
    # the file is copied to /etc/lllmsd/config.yaml by make install-service: it must not ship a real key
    assert "api_keys" not in yaml.safe_load((ROOT / "config.hub.yaml").read_text())


def test_the_hub_piper_voice_fetches_both_of_its_files() -> None:
    hub = load_config(ROOT / "config.hub.yaml", environ={})
    voice = hub.models["piper-joe"]
    assert voice.repo == "rhasspy/piper-voices"
    assert voice.allow_patterns == ["en/en_US/joe/medium/en_US-joe-medium.onnx*"]
