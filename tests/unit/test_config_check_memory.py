"""`lllmsd config check` and memory: min_instances that cannot all fit are an error; a GPU that is not
there is a warning, found before any weights load."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner

from lllmsd.cli import main
from tests.setup_models import model_path


def check(tmp_path: Path, config: dict[str, object]) -> tuple[int, str]:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["config", "check", "-c", str(path)])
    return result.exit_code, result.output


def test_min_instances_beyond_the_budget_are_an_error(tmp_path: Path) -> None:
    fake = {"task": "text-completion", "engine": "fake", "memory_estimate": "600MiB", "min_instances": 1}
    code, output = check(tmp_path, {"memory_budget": "1GiB", "models": {"a": fake, "b": fake}})
    assert code == 2
    assert "min_instances need 1200 MiB (a 600 MiB, b 600 MiB), more than memory_budget (1024 MiB)" in output
    code, output = check(tmp_path, {"memory_budget": "2GiB", "models": {"a": fake, "b": fake}})
    assert code == 0, output


def test_min_instances_of_a_gguf_are_counted_from_its_metadata(tmp_path: Path) -> None:
    smollm2 = {
        "task": "text-completion",
        "engine": "llama-cpp",
        "location": str(model_path("smollm2")),
        "context_size": 8192,
        "min_instances": 2,
        "max_instances": 2,
    }
    code, output = check(tmp_path, {"memory_budget": "600MiB", "models": {"chat": smollm2}})
    assert code == 2
    # two instances of about 343 MiB each (weights, an 8192-token f16 KV cache, activations; flash
    # attention, on by default, keeps no score matrices over the context)
    assert "min_instances need 68" in output
    assert "(chat 68" in output


def test_gpu_asked_of_a_cpu_only_machine_is_a_warning(tmp_path: Path) -> None:
    models = {
        "chat": {
            "task": "text-completion",
            "engine": "llama-cpp",
            "location": str(model_path("smollm2")),
            "gpu_layers": -1,
        },
        "stt": {
            "task": "speech-to-text",
            "engine": "faster-whisper",
            "location": str(model_path("whisper-tiny-en")),
            "device": "cuda",
        },
    }
    code, output = check(tmp_path, {"models": models})
    assert code == 0, output
    assert "warning: models.chat.gpu_layers: gpu_layers -1 asked, but this llama-cpp-python build has no GPU" in output
    assert "make install ACCEL=cuda" in output
    assert "warning: models.stt.device: cuda asked, but CTranslate2 sees no CUDA device here" in output


def test_more_slots_than_the_concurrency_cap_is_a_warning(tmp_path: Path) -> None:
    chat = {"task": "text-completion", "engine": "llama-cpp", "location": str(model_path("smollm2")), "slots": 4}
    code, output = check(tmp_path, {"concurrency": 2, "models": {"chat": chat}})
    assert code == 0, output
    assert "warning: models.chat.slots: 4 slots, but the daemon's concurrency is 2" in output
    code, output = check(tmp_path, {"concurrency": 4, "models": {"chat": chat}})
    assert code == 0, output
    assert "warning" not in output
