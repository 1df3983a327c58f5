"""ModelStore: where each model's weights are, downloading them first when they are not there yet.

Sources: a ``location`` (a local file or folder, used as is, never copied or deleted), a Hub file
(``url:`` or ``repo`` + ``file``), a Hub folder (``repo`` [+ ``allow_patterns``]), or nothing (fake
models). Hub sources download through huggingface_hub into ``cache_dir`` (see ``download.py``).

Concurrency rules: bookkeeping (running downloads, resolved paths) lives on the event loop and is only
changed by code with no ``await`` between a check and its effect. One download runs per model (and
source) at a time, in a worker thread; every ``files()`` call for that model awaits the same task,
shielded, so a waiter that goes away never cancels the download the others wait for. A failed download
fails all of them with ``ModelUnavailable`` and is forgotten: the next ``files()`` call starts over.
Progress records are written by the download thread and read by ``status()`` (see FileProgress).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lllmsd.core.clock import Clock
from lllmsd.core.download import (
    CacheState,
    DisplayFactory,
    DownloadCancelled,
    DownloadFailed,
    FileProgress,
    Hub,
    cache_state,
    remove_cached,
    verify_sha256,
)
from lllmsd.core.download_source import Source, SourceError, source_of
from lllmsd.engines.base import ModelFiles
from lllmsd.errors import ModelUnavailable, ShuttingDown

log = logging.getLogger(__name__)

CLOSE_TIMEOUT = 5.0  # seconds shutdown waits for download threads to notice they are cancelled


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


@dataclass(frozen=True)
class _Resolved:
    files: ModelFiles
    stamp: tuple[int, int] | None  # (size, mtime) of a file: a changed or deleted file is fetched again

    def still_valid(self) -> bool:
        path = self.files.path
        if path is None or not path.exists():
            return False
        return self.stamp is None or self.stamp == _stamp(path)


def _stamp(path: Path) -> tuple[int, int] | None:
    if not path.is_file():
        return None
    st = path.stat()
    return (st.st_size, st.st_mtime_ns)


class ModelStore:
    def __init__(
        self,
        cache_dir: Path,
        *,
        base_dir: Path | None = None,
        endpoint: str | None = None,
        offline: bool | None = None,
        clock: Clock | None = None,
    ) -> None:
        """``endpoint`` and ``offline`` default to HF_ENDPOINT and HF_HUB_OFFLINE as they are now (not as
        they were when huggingface_hub was imported), so each store, and each test, can have its own."""
        self.cache_dir = Path(cache_dir)
        self.base_dir = base_dir or Path.cwd()
        self.hub = Hub(
            self.cache_dir,
            endpoint=(endpoint or os.environ.get("HF_ENDPOINT") or None),
            offline=_env_flag("HF_HUB_OFFLINE") if offline is None else offline,
        )
        self._now: Callable[[], float] = clock.now if clock is not None else time.monotonic
        self._jobs: dict[tuple[str, Source], asyncio.Task[ModelFiles]] = {}
        self._resolved: dict[tuple[str, Source], _Resolved] = {}
        self._progress: dict[str, dict[str, FileProgress]] = {}  # model -> file -> its latest download
        self._cancel = threading.Event()

    # ----------------------------------------------------------------------------------- async API

    async def files(self, model_id: str, config: Any) -> ModelFiles:
        """The model's weights, downloading them first if needed (waiting for a running download)."""
        source = self._source(model_id, config)
        if source.kind == "none":
            return ModelFiles(None)
        key = (model_id, source)
        resolved = self._resolved.get(key)
        if resolved is not None and resolved.still_valid():
            return resolved.files
        if source.kind == "location":
            return await self._local(key, config)
        job = self._jobs.get(key) or self._start(key, config)
        return await asyncio.shield(job)

    def prefetch(self, model_id: str, config: Any) -> None:
        """Start downloading in the background (``prepare: async``); failures are logged and shown in
        ``status()``, and the next request tries again."""
        try:
            source = self._source(model_id, config)
        except ModelUnavailable as exc:
            log.error("%s", exc.message)
            return
        key = (model_id, source)
        if source.kind in ("file", "folder") and key not in self._jobs:
            resolved = self._resolved.get(key)
            if resolved is None or not resolved.still_valid():
                self._start(key, config)

    def status(self) -> list[dict[str, Any]]:
        return [record.as_dict() for files in list(self._progress.values()) for record in list(files.values())]

    async def close(self) -> None:
        """Cancel running downloads: their threads stop at the next chunk they receive."""
        self._cancel.set()
        jobs = list(self._jobs.values())
        if jobs:
            await asyncio.wait(jobs, timeout=CLOSE_TIMEOUT)

    # ---------------------------------------------------------------------------- blocking API (CLI)

    def pull(self, model_id: str, config: Any, display: DisplayFactory | None = None) -> Path | None:
        """Download a model now, in this thread (``lllmsd pull``). Raises ModelUnavailable."""
        source = self._source(model_id, config)
        if source.kind == "none":
            return None
        if source.kind == "location":
            path = self.local_path(source.location or Path())
            if not path.exists():
                raise ModelUnavailable(f"model '{model_id}': location {path} does not exist")
            return path
        try:
            return self._fetch(model_id, config, source, display)
        except DownloadFailed as exc:
            raise ModelUnavailable(f"model '{model_id}' is unavailable: {exc}") from None

    def cache_state(self, model_id: str, config: Any) -> CacheState:
        source = self._source(model_id, config)
        if source.kind == "location":
            source = Source("location", location=self.local_path(source.location or Path()))
        return cache_state(self.cache_dir, source)

    def remove(self, model_id: str, config: Any) -> int:
        """Delete a Hub model's cached files; returns bytes freed. A ``location`` is never touched."""
        source = self._source(model_id, config)
        if source.kind not in ("file", "folder"):
            return 0
        for key in [k for k in self._resolved if k[0] == model_id]:
            del self._resolved[key]
        return remove_cached(self.cache_dir, source)

    def local_path(self, location: Path) -> Path:
        """A relative location is relative to the config file's folder."""
        path = location.expanduser()
        return path if path.is_absolute() else (self.base_dir / path)

    # --------------------------------------------------------------------------------------- inside

    def _source(self, model_id: str, config: Any) -> Source:
        try:
            return source_of(config)
        except SourceError as exc:
            raise ModelUnavailable(f"model '{model_id}': refusing its source: {exc}") from None

    def _start(self, key: tuple[str, Source], config: Any) -> asyncio.Task[ModelFiles]:
        model_id, source = key
        self._progress[model_id] = {}  # a new attempt: forget the last one's records
        log.info("%s: fetching %s", model_id, source.describe())
        task = asyncio.ensure_future(asyncio.to_thread(self._fetch, model_id, config, source, None))
        job = asyncio.ensure_future(self._finish(key, task))
        self._jobs[key] = job
        job.add_done_callback(lambda done: self._forget(key, done))
        return job

    async def _finish(self, key: tuple[str, Source], task: asyncio.Future[Path]) -> ModelFiles:
        model_id, source = key
        try:
            path = await task
        except DownloadCancelled:
            raise ShuttingDown(f"the daemon is shutting down; the download of '{model_id}' stopped") from None
        except DownloadFailed as exc:
            raise ModelUnavailable(f"model '{model_id}' is unavailable: {exc}") from None
        files = ModelFiles(path)
        self._resolved[key] = _Resolved(files, _stamp(path))
        log.info("%s: %s ready at %s", model_id, source.describe(), path)
        return files

    def _forget(self, key: tuple[str, Source], job: asyncio.Task[ModelFiles]) -> None:
        if self._jobs.get(key) is job:
            del self._jobs[key]
        if not job.cancelled() and job.exception() is not None:  # retrieved here, so never "unhandled"
            log.error("%s: %s", key[0], getattr(job.exception(), "message", job.exception()))

    def _fetch(self, model_id: str, config: Any, source: Source, display: DisplayFactory | None) -> Path:
        token = config.token.get_secret_value() if config.token is not None else None
        return self.hub.fetch(
            model_id,
            source,
            token=token or None,
            progress=lambda file, size: self._record(model_id, file, size),
            cancel=self._cancel,
            display=display,
            sha256=config.sha256,
        )

    def _record(self, model_id: str, file: str, size: int | None) -> FileProgress:
        """The progress record of one file of the model's current download (made on first use)."""
        files = self._progress.setdefault(model_id, {})
        record = files.get(file)
        if record is None:
            record = files[file] = FileProgress(model_id, file, size, now=self._now)
        return record

    async def _local(self, key: tuple[str, Source], config: Any) -> ModelFiles:
        model_id, source = key
        path = self.local_path(source.location or Path())
        if not path.exists():
            raise ModelUnavailable(f"model '{model_id}': location {path} does not exist")
        if config.sha256 is not None and path.is_file():
            try:  # hashing a multi-GB file takes seconds: never on the event loop
                await asyncio.to_thread(verify_sha256, path, config.sha256, delete=False)
            except DownloadFailed as exc:
                raise ModelUnavailable(f"model '{model_id}': location {exc}") from None
        files = ModelFiles(path)
        self._resolved[key] = _Resolved(files, _stamp(path))
        return files
