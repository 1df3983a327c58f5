"""ModelStore: where each model's weights are, fetching them first when they are not there yet.

This is the minimal store: local locations and sourceless (fake) models, plus a plain
huggingface_hub download. Progress, verification, resume and the CLI commands build on it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from lllmsd.engines.base import ModelFiles
from lllmsd.errors import ModelUnavailable

log = logging.getLogger(__name__)


class ModelStore:
    def __init__(self, cache_dir: Path, *, base_dir: Path | None = None) -> None:
        self.cache_dir = cache_dir
        self.base_dir = base_dir or Path.cwd()

    async def files(self, model_id: str, config: Any) -> ModelFiles:
        if config.location is not None:
            path = self.local_path(config.location)
            if not path.exists():
                raise ModelUnavailable(f"model '{model_id}': location {path} does not exist")
            return ModelFiles(path)
        if config.url is None and config.repo is None:
            return ModelFiles(None)
        return await asyncio.to_thread(self._download, model_id, config)

    def local_path(self, location: Path) -> Path:
        """A relative location is relative to the config file's folder."""
        path = location.expanduser()
        return path if path.is_absolute() else (self.base_dir / path)

    def _download(self, model_id: str, config: Any) -> ModelFiles:
        from huggingface_hub import hf_hub_download, snapshot_download

        token = config.token.get_secret_value() if config.token else None
        try:
            if config.file is not None:
                path = hf_hub_download(
                    config.repo, config.file, revision=config.revision, cache_dir=self.cache_dir, token=token
                )
            else:
                path = snapshot_download(
                    config.repo,
                    revision=config.revision,
                    allow_patterns=config.allow_patterns,
                    cache_dir=self.cache_dir,
                    token=token,
                )
        except Exception as exc:
            raise ModelUnavailable(f"model '{model_id}': download failed: {type(exc).__name__}: {exc}") from exc
        return ModelFiles(Path(path))

    def status(self) -> list[dict[str, Any]]:
        return []
