"""The `lllmsd` command: parses arguments, calls the services, reports. Nothing else lives here."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from lllmsd import __version__
from lllmsd.config import ConfigError, DaemonConfig, config_json_schema, load_config

log = logging.getLogger("lllmsd")

LOG_LEVELS = ("debug", "info", "warning", "error")
CONFIG_OPTION = click.option(
    "-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
    help="The YAML config file.",
)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def load_or_exit(path: Path) -> DaemonConfig:
    """The config, or every problem printed with its path and exit code 2 (no traceback)."""
    try:
        return load_config(path)
    except ConfigError as exc:
        click.echo(f"{path}: invalid config:", err=True)
        for line in exc.lines():
            click.echo(f"  {line}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lllmsd")
def main() -> None:
    """A local-model daemon that serves chat, embedding and Whisper models over the OpenAI API."""


@main.command()
@CONFIG_OPTION
@click.option("--host", help="Listen address (overrides listen.host).")
@click.option("--port", type=click.IntRange(1, 65535), help="Listen port (overrides listen.port).")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True)
def serve(config_path: Path, host: str | None, port: int | None, log_level: str) -> None:
    """Serve the models of a config file until SIGINT or SIGTERM."""
    from lllmsd.server import run_server

    configure_logging(log_level)
    config = load_or_exit(config_path)
    run_server(config, config_path=config_path, host=host, port=port)


@main.group()
def config() -> None:
    """Check a config file or print its JSON Schema."""


@config.command("check")
@CONFIG_OPTION
def config_check(config_path: Path) -> None:
    """Validate a config file: every problem with its path, exit code 2 if there are any."""
    loaded = load_or_exit(config_path)
    click.echo(f"{config_path}: ok ({len(loaded.models)} models: {', '.join(loaded.models) or 'none'})")


@config.command("reference")
def config_reference_command() -> None:
    """Print the config reference (every option, its type, default and meaning) in Markdown."""
    from lllmsd.config_reference import config_reference

    click.echo(config_reference(), nl=False)


@config.command("schema")
def config_schema() -> None:
    """Print the config file's JSON Schema."""
    click.echo(json.dumps(config_json_schema(), indent=2))


if __name__ == "__main__":  # pragma: no cover
    main()
