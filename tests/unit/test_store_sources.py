"""Model sources: url parsing, names that could escape the cache, and download progress arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest

from lllmsd.config import ConfigError, FakeModelConfig, parse_config
from lllmsd.core.download import FileProgress
from lllmsd.core.download_source import parse_hub_url, source_of
from lllmsd.core.store import ModelStore
from lllmsd.errors import ModelUnavailable


def fake(**source: object) -> dict[str, object]:
    return {"engine": "fake", "task": "text-completion", **source}


def test_a_hub_url_is_split_into_repo_revision_and_file() -> None:
    url = "https://huggingface.co/bartowski/SmolLM2-135M-Instruct-GGUF/resolve/main/sub/SmolLM2.Q4_K_M.gguf"
    assert parse_hub_url(url) == (None, "bartowski/SmolLM2-135M-Instruct-GGUF", "main", "sub/SmolLM2.Q4_K_M.gguf")
    # an encoded revision (a pull request ref) comes back decoded
    assert parse_hub_url("https://hf.co/a/b/blob/refs%2Fpr%2F3/x.gguf")[2] == "refs/pr/3"


def test_a_link_to_another_host_names_its_own_endpoint() -> None:
    endpoint, repo, _, file = parse_hub_url("http://mirror.local:8080/org/m/resolve/v1/m.gguf")
    assert (endpoint, repo, file) == ("http://mirror.local:8080", "org/m", "m.gguf")


def test_sources_of_each_kind() -> None:
    models = parse_config(
        {
            "models": {
                "file": fake(repo="org/m", file="m.gguf", revision="v2"),
                "folder": fake(repo="org/st", allow_patterns=["*.json", "1_Pooling/*"]),
                "local": fake(location="weights/m.gguf"),
                "none": fake(),
            }
        }
    ).models
    assert source_of(models["file"]).describe() == "org/m/m.gguf@v2"
    assert source_of(models["folder"]).allow_patterns == ("*.json", "1_Pooling/*")
    assert source_of(models["local"]).kind == "location"
    assert source_of(models["none"]).kind == "none"


TRAVERSALS = [
    ({"repo": "../../etc", "file": "passwd"}, "models.m.repo"),
    ({"repo": "org/..", "file": "x"}, "models.m.repo"),
    ({"repo": "org/name/extra", "file": "x"}, "models.m.repo"),
    ({"repo": "org/m", "file": "../../../.bashrc"}, "models.m.file"),
    ({"repo": "org/m", "file": "/etc/passwd"}, "models.m.file"),
    ({"repo": "org/m", "file": "a/./b"}, "models.m.file"),
    ({"repo": "org/m", "revision": "../../x", "file": "m.gguf"}, "models.m.revision"),
    ({"repo": "org/m", "allow_patterns": ["../*"]}, "models.m.allow_patterns"),
    ({"url": "https://huggingface.co/org/m/resolve/main/../../x"}, "models.m.url"),
    ({"url": "https://huggingface.co/org/m/resolve/main/%2E%2E/%2E%2E/x"}, "models.m.url"),
    ({"url": "https://huggingface.co/org/m/resolve/..%2F..%2Fx/m.gguf"}, "models.m.url"),
]


@pytest.mark.parametrize(("source", "path"), TRAVERSALS)
def test_a_name_that_could_leave_the_cache_is_a_config_error(source: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"models": {"m": fake(**source)}})
    assert [p for p, _ in caught.value.problems] == [path]


@pytest.mark.parametrize(("source", "path"), TRAVERSALS)
async def test_the_store_refuses_it_too_without_touching_the_disk(
    source: dict[str, object], path: str, tmp_path: Path
) -> None:
    # model_validate checks field types only: this is a config that skipped the cross-field checks
    config = FakeModelConfig.model_validate(fake(**source))
    store = ModelStore(tmp_path / "cache", endpoint="http://127.0.0.1:9")
    with pytest.raises(ModelUnavailable, match="refusing its source"):
        await store.files("m", config)
    assert not (tmp_path / "cache").exists()


def test_sha256_on_a_folder_and_an_unset_token_variable_are_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLLMSD_TEST_TOKEN", raising=False)
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "models": {
                    "a": fake(repo="org/st", sha256="0" * 64),
                    "b": fake(repo="org/m", file="m.gguf", token="${LLLMSD_TEST_TOKEN}"),
                }
            }
        )
    assert [p for p, _ in caught.value.problems] == ["models.a.sha256", "models.b.token"]
    monkeypatch.setenv("LLLMSD_TEST_TOKEN", "hf_abc")
    model = parse_config({"models": {"b": fake(repo="org/m", file="m.gguf", token="${LLLMSD_TEST_TOKEN}")}})
    assert model.models["b"].token is not None
    assert model.models["b"].token.get_secret_value() == "hf_abc"
    assert "hf_abc" not in repr(model)


def test_progress_speed_and_eta_come_from_recent_samples() -> None:
    now = [100.0]
    record = FileProgress("m", "m.gguf", now=lambda: now[0])
    assert record.as_dict()["state"] == "pending"
    record.begin(total=10_000, initial=1_000)  # 1000 bytes were already there (a resumed download)
    now[0] += 2
    record.advance(4_000)
    shown = record.as_dict()
    assert shown["bytes_done"] == 5_000
    assert shown["speed_bytes_per_second"] == 2_000
    assert shown["eta_seconds"] == 2.5
    now[0] += 10  # older samples leave the window: the speed follows the latest rate
    record.advance(1_000)
    now[0] += 1
    record.advance(1_000)
    assert record.as_dict()["speed_bytes_per_second"] == 1_000
    record.finish("done", size=10_000)
    assert record.as_dict() | {"model": None} == {
        "model": None,
        "file": "m.gguf",
        "state": "done",
        "bytes_done": 10_000,
        "bytes_total": 10_000,
        "speed_bytes_per_second": None,
        "eta_seconds": None,
        "error": None,
    }
