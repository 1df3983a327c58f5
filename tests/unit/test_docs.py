"""The README's config reference is generated from the config models: it must match them."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from lllmsd.cli import main
from lllmsd.config_reference import BEGIN, END, config_reference

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_config_reference_is_current() -> None:
    text = README.read_text(encoding="utf-8")
    section = text.split(BEGIN, 1)[1].split(END, 1)[0]
    assert section.strip() == config_reference().strip(), (
        "README.md's config reference is stale: run `python -m lllmsd.config_reference --write README.md`"
    )


def test_reference_covers_every_documented_option() -> None:
    reference = config_reference()
    for key in ("max_instances", "ttl", "queue_timeout", "chat_format", "backend", "compute_type", "fail_on_load"):
        assert f"| `{key}` |" in reference


def test_reference_command_prints_it() -> None:
    result = CliRunner().invoke(main, ["config", "reference"])
    assert result.exit_code == 0
    assert result.output == config_reference()
