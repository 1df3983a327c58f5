"""Config loading: what a good config gives, and that every mistake is named by its YAML path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lllmsd.cli import main
from lllmsd.config import CompletionDefaults, ConfigError, load_config, parse_config
from lllmsd.core.jobs import ModelTask, Sampling

ROOT = Path(__file__).resolve().parents[2]

ISSUE_EXAMPLE = """
listen: {host: 127.0.0.1, port: 3000}
concurrency: 2
cache_dir: ~/.cache/lllmsd
api_keys: []
models:
  chat:
    task: text-completion
    engine: fake
    url: https://huggingface.co/ORG/REPO/resolve/main/FILE.gguf
    sha256: null
    context_size: 2048
    min_instances: 0
    max_instances: 2
    ttl: 300
    preload: {messages: [{role: system, content: You are the Batman.}]}
    completion_defaults: {temperature: 0.7}
    device: {threads: null}
"""


FAKE = {"task": "text-completion", "engine": "fake"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return path


def check(path: Path) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["config", "check", "-c", str(path)])
    return result.exit_code, result.output


def test_the_issue_example_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ISSUE_EXAMPLE))
    chat = config.models["chat"]
    assert chat.task is ModelTask.TEXT_COMPLETION
    assert (chat.max_instances, chat.ttl, chat.context_size) == (2, 300, 2048)
    assert chat.preload is not None
    assert chat.preload.to_preload().messages[0].content == "You are the Batman."
    assert config.cache_dir == Path("~/.cache/lllmsd").expanduser()


def test_lllms_camel_case_names_are_accepted() -> None:
    config = parse_config(
        {
            "models": {
                "m": {
                    "task": "text-completion",
                    "engine": "fake",
                    "minInstances": 1,
                    "maxInstances": 3,
                    "contextSize": 512,
                    "completionDefaults": {"temperature": 0.2},
                }
            }
        }
    )
    model = config.models["m"]
    assert (model.min_instances, model.max_instances, model.context_size) == (1, 3, 512)
    assert model.completion_defaults.temperature == 0.2


def test_defaults_are_safe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = parse_config({})
    assert config.listen.host == "127.0.0.1"
    assert config.cache_dir == tmp_path / "lllmsd"
    assert config.api_keys == []


def test_the_example_config_checks() -> None:
    code, output = check(ROOT / "config.example.yaml")
    assert code == 0, output
    assert "ok" in output


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        pytest.param(
            "models: {chat: {task: text-completion, engine: fake, bogus: 1}}",
            "models.chat.bogus: unknown key",
            id="unknown-key",
        ),
        pytest.param(
            "models: {chat: {task: text-completion, engine: fake, ttl: soon}}",
            "models.chat.ttl: Input should be a valid number",
            id="wrong-type",
        ),
        pytest.param(
            "models: {chat: {task: speech-to-text, engine: gpt4all, location: /x}}",
            "models.chat.task: the gpt4all engine cannot do speech-to-text",
            id="task-engine-pair",
        ),
        pytest.param(
            "models: {chat: {task: text-completion, engine: fake, min_instances: 3, max_instances: 2}}",
            "models.chat.max_instances: must be >= min_instances (3 > 2)",
            id="min-above-max",
        ),
        pytest.param(
            "models: {chat: {task: text-completion, engine: llama-cpp}}",
            "models.chat: needs a source: url, repo (+ file or allow_patterns) or location",
            id="missing-source",
        ),
        pytest.param(
            "listen: {port: -1}", "listen.port: Input should be greater than or equal to 1", id="negative-port"
        ),
        pytest.param("models: {chat: {task: [", "invalid YAML at line 1", id="bad-yaml"),
        pytest.param(
            "models: {chat: {task: text-completion, engine: nope}}",
            "models.chat.engine: unknown engine 'nope'",
            id="unknown-engine",
        ),
        pytest.param(
            "models: {chat: {task: text-completion, engine: fake, url: 'https://example.com/x'}}",
            "models.chat.url: must look like https://huggingface.co/ORG/REPO/resolve/REVISION/PATH",
            id="bad-url",
        ),
        pytest.param(
            "models: {chat: {task: embedding, engine: fake, preload: {prefix: hi}}}",
            "models.chat.preload: only text-completion models can preload",
            id="preload-on-embedding",
        ),
        pytest.param("models: {'bad id!': {task: text-completion, engine: fake}}", "models.bad id!:", id="bad-id"),
        pytest.param("- just\n- a list\n", "the config must be a mapping", id="not-a-mapping"),
    ],
)
def test_config_mistakes_are_named_by_path(tmp_path: Path, yaml_text: str, expected: str) -> None:
    code, output = check(write(tmp_path, yaml_text))
    assert code == 2
    assert expected in output
    assert "Traceback" not in output


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    code, output = check(tmp_path / "nope.yaml")
    assert code == 2
    assert "no such file" in output


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = (
        "listen: {port: 0}\n"
        "models:\n"
        "  a: {task: text-completion, engine: fake, bogus: 1}\n"
        "  b: {task: text-completion, engine: fake, ttl: -5}\n"
    )
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text))
    paths = [path for path, _ in error.value.problems]
    assert paths == ["listen.port", "models.a.bogus", "models.b.ttl"]


def test_a_missing_engine_extra_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real_find_spec(name, *a)
    )
    with pytest.raises(ConfigError) as error:
        parse_config({"models": {"chat": {"task": "text-completion", "engine": "llama-cpp", "location": "/m.gguf"}}})
    assert error.value.lines() == [
        "models.chat.engine: the llama-cpp engine needs llama_cpp: run pip install 'lllmsd[llama-cpp]'"
    ]


def test_token_comes_from_the_environment_and_stays_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_HF_TOKEN", "hf_secret")
    config = parse_config({"models": {"m": {**FAKE, "repo": "a/b", "file": "f", "token": "${MY_HF_TOKEN}"}}})
    token = config.models["m"].token
    assert token is not None
    assert token.get_secret_value() == "hf_secret"
    assert "hf_secret" not in repr(config)


def test_schema_command_prints_a_json_schema_with_descriptions() -> None:
    result = CliRunner().invoke(main, ["config", "schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    fields = schema["$defs"]["FakeModelConfig"]["properties"]
    assert "max_instances" in fields
    assert all("description" in spec for spec in fields.values())


def test_completion_defaults_fill_only_what_the_request_left_out() -> None:
    defaults = CompletionDefaults(temperature=0.7, max_tokens=100, stop=["END"])
    merged = defaults.apply(Sampling(temperature=0.1, top_p=0.5))
    assert (merged.temperature, merged.top_p, merged.max_tokens, merged.stop) == (0.1, 0.5, 100, ("END",))
    assert defaults.apply(Sampling(stop=("x",))).stop == ("x",)


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"], ["config", "--help"], ["--version"]])
def test_cli_help_and_version(args: list[str]) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0
    assert result.output


def test_serve_refuses_a_bad_config(tmp_path: Path) -> None:
    path = write(tmp_path, "models: {chat: {task: text-completion, engine: fake, ttl: -9}}")
    result = CliRunner().invoke(main, ["serve", "-c", str(path)])
    assert result.exit_code == 2
    assert "models.chat.ttl" in result.output


def test_python_dash_m_runs_the_same_cli() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "lllmsd", "config", "check", "-c", str(ROOT / "config.example.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "4 models" in result.stdout
