"""The `lllmsd` command: parses arguments, calls the services, reports. Nothing else lives here."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from lllmsd import __version__
from lllmsd.config import ConfigError, DaemonConfig, config_json_schema, load_config

log = logging.getLogger("lllmsd")

LOG_LEVELS = ("debug", "info", "warning", "error")
CONFIG_OPTION = click.option(
    "-c",
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The YAML config file.",
)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def load_or_exit(path: Path, *, check_installed: bool = True) -> DaemonConfig:
    """The config, or every problem printed with its path and exit code 2 (no traceback)."""
    try:
        return load_config(path, check_installed=check_installed)
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
@click.option(
    "--port", type=click.IntRange(0, 65535), help="Listen port (overrides listen.port; 0 = any free port, logged)."
)
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True)
@click.option(
    "--pid-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the daemon's pid here while it runs (for `lllmsd reload --pid-file`).",
)
def serve(config_path: Path, host: str | None, port: int | None, log_level: str, pid_file: Path | None) -> None:
    """Serve the models of a config file until SIGINT or SIGTERM (it drains first: new requests get 503, the
    ones in the daemon get shutdown_grace seconds); SIGHUP re-reads the config."""
    from lllmsd.server import run_server

    configure_logging(log_level)
    config = load_or_exit(config_path)
    run_server(config, config_path=config_path, host=host, port=port, pid_file=pid_file)


@main.command()
@click.option("--pid", type=click.IntRange(1), help="The daemon's process id.")
@click.option(
    "--pid-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The file `lllmsd serve --pid-file` wrote.",
)
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Check this config file first and do not signal the daemon if it is invalid.",
)
def reload(pid: int | None, pid_file: Path | None, config_path: Path | None) -> None:
    """Make a running daemon re-read its config file (sends it SIGHUP).

    Added models appear, removed ones finish their requests and unload, changed ones are replaced
    (the old instances unload once idle). A config the daemon cannot load is refused and logged, and
    the old one keeps serving. Under systemd, use `systemctl reload lllmsd`.
    """
    if (pid is None) == (pid_file is None):
        raise click.UsageError("give --pid or --pid-file")
    if pid_file is not None:
        text = pid_file.read_text(encoding="utf-8").strip()
        if not text.isdigit():
            raise click.UsageError(f"{pid_file} does not hold a process id")
        pid = int(text)
    if config_path is not None:
        load_or_exit(config_path)
    assert pid is not None
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        click.echo(f"no process {pid}: is the daemon running?", err=True)
        sys.exit(1)
    except PermissionError:
        click.echo(f"not allowed to signal process {pid} (run as the daemon's user or root)", err=True)
        sys.exit(1)
    click.echo(f"sent SIGHUP to {pid}; the daemon logs what changed")


@main.group()
def config() -> None:
    """Check a config file or print its JSON Schema."""


@config.command("check")
@CONFIG_OPTION
def config_check(config_path: Path) -> None:
    """Validate a config file: every problem with its path, exit code 2 if there are any; warn about what
    will not work on this machine (a cuda device with no CUDA, offload on a CPU-only build)."""
    loaded = load_or_exit(config_path)
    from lllmsd.core.budget import budget_bytes
    from lllmsd.core.estimate import min_instances_problems
    from lllmsd.engines.registry import builtin_engines

    engines = builtin_engines()
    classes = {m: engines[c.engine].class_for(c.task) for m, c in loaded.models.items()}
    for model_id, model in loaded.models.items():
        for field, message in classes[model_id].config_warnings(model):
            click.echo(f"{config_path}: warning: models.{model_id}.{field}: {message}", err=True)
    for path, message in loaded.warnings():
        click.echo(f"{config_path}: warning: {path}: {message}", err=True)
    problems = min_instances_problems(loaded.models, classes, budget_bytes(loaded.memory_budget))
    if problems:
        click.echo(f"{config_path}: invalid config:", err=True)
        for line in problems:
            click.echo(f"  memory_budget: {line}", err=True)
        sys.exit(2)
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


# ------------------------------------------------------------------------------ the model store


def _store_and_models(config_path: Path, names: tuple[str, ...]) -> tuple[Any, dict[str, Any]]:
    """The config's store and the models named (all if none); unknown names are a usage error (exit 2).
    Engines need not be installed: fetching weights does not run them."""
    from lllmsd.core.store import ModelStore

    loaded = load_or_exit(config_path, check_installed=False)
    unknown = [n for n in names if n not in loaded.models]
    if unknown:
        raise click.UsageError(f"not in {config_path}: {', '.join(unknown)} (it has: {', '.join(loaded.models)})")
    models = {n: loaded.models[n] for n in (names or tuple(loaded.models))}
    return ModelStore(loaded.cache_dir, base_dir=config_path.resolve().parent), models


def _progress_bar(file: str, total: int | None, initial: int) -> Any:
    from tqdm import tqdm

    return tqdm(desc=file, total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, leave=True)


def _size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


@main.command()
@CONFIG_OPTION
@click.argument("models", nargs=-1)
def pull(config_path: Path, models: tuple[str, ...]) -> None:
    """Download models' weights ahead of time (all models if none are named), a progress bar per file."""
    from lllmsd.errors import ModelUnavailable

    store, selected = _store_and_models(config_path, models)
    failed = 0
    for model_id, model in selected.items():
        try:
            path = store.pull(model_id, model, display=_progress_bar)
        except ModelUnavailable as exc:
            click.echo(f"{model_id}: failed: {exc.message}", err=True)
            failed += 1
            continue
        click.echo(f"{model_id}: {'no weights needed' if path is None else path}")
    sys.exit(1 if failed else 0)


@main.command("ls")
@CONFIG_OPTION
def list_models(config_path: Path) -> None:
    """List the config's models: source, cache state and size on disk. Makes no network request."""
    store, selected = _store_and_models(config_path, ())
    rows = [("MODEL", "ENGINE", "SOURCE", "STATE", "SIZE")]
    for model_id, model in selected.items():
        state = store.cache_state(model_id, model)
        source = source_label(model)
        rows.append((model_id, model.engine, source, state.state, _size(state.size)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def source_label(model: Any) -> str:
    from lllmsd.core.download_source import SourceError, source_of

    try:
        return source_of(model).describe()
    except SourceError as exc:  # cannot happen for a loaded config; said rather than raised
        return f"invalid ({exc})"


@main.command("rm")
@CONFIG_OPTION
@click.argument("models", nargs=-1, required=True)
def remove(config_path: Path, models: tuple[str, ...]) -> None:
    """Delete models' downloaded files from the cache. A `location:` is never touched."""
    store, selected = _store_and_models(config_path, models)
    failed = 0
    for model_id, model in selected.items():
        if model.location is not None:
            click.echo(f"{model_id}: uses location {model.location}; lllmsd never deletes local files", err=True)
            failed += 1
            continue
        try:
            freed = store.remove(model_id, model)
        except OSError as exc:
            click.echo(f"{model_id}: failed: {exc}", err=True)
            failed += 1
            continue
        click.echo(f"{model_id}: {'removed, ' + _size(freed) + ' freed' if freed else 'nothing cached'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
