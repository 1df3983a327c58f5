"""The blocking half of the model store: huggingface_hub downloads, progress, sha256, cache inspection.

Everything here blocks (network, disk, hashing) and runs in a worker thread (the daemon) or directly
(the CLI). Files land in huggingface_hub's cache layout under ``cache_dir``
(``models--ORG--NAME/{blobs,snapshots,refs}``), written through ``hf_hub_download``: a download goes to
a process-unique temporary file that is renamed into place, under a per-blob file lock, so two daemons
sharing a cache download a file once and never see a half-written one. A connection cut mid-file is
resumed with an HTTP Range request by huggingface_hub (up to 5 times, while bytes keep arriving).

Progress: huggingface_hub drives a tqdm-like bar per file; ``tqdm_class`` hands it ours, which records
bytes for ``GET /``, forwards to an optional display (the CLI's bars) and raises when the download is
cancelled (the only point where a download thread can be stopped).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lllmsd.core.download_source import Source, SourceError, check_repo_path

log = logging.getLogger(__name__)

HASH_CHUNK = 4 * 1024 * 1024
SPEED_WINDOW = 5.0  # seconds of samples the speed is averaged over


class DownloadCancelled(Exception):
    """The daemon is shutting down: the download thread stops at its next chunk."""


class DownloadFailed(Exception):
    """A download or verification failed; the message is for users and never holds a token."""


class Display(Protocol):
    def update(self, n: int) -> None: ...

    def close(self) -> None: ...


DisplayFactory = Callable[[str, int | None, int], Display]  # (file, total bytes, bytes already there)


# ------------------------------------------------------------------------------------------ progress


class FileProgress:
    """One file's download, as ``GET /`` shows it. Written by the download thread, read by the event loop:
    every field is replaced whole under ``_lock`` so a reader never sees a half-updated sample."""

    def __init__(self, model: str, file: str, total: int | None = None, now: Callable[[], float] = time.monotonic):
        self.model = model
        self.file = file
        self.state = "pending"  # pending, downloading, verifying, done, failed, cancelled
        self.done = 0
        self.total = total
        self.error: str | None = None
        self._now = now
        self._samples: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def begin(self, total: int | None, initial: int) -> None:
        with self._lock:
            self.state = "downloading"
            self.total = total if total is not None else self.total
            self.done = initial
            self._samples.clear()
            self._samples.append((self._now(), initial))

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = self._now()
            self._samples.append((now, self.done))
            while len(self._samples) > 2 and now - self._samples[0][0] > SPEED_WINDOW:
                self._samples.popleft()

    def finish(self, state: str, *, size: int | None = None, error: str | None = None) -> None:
        with self._lock:
            self.state = state
            self.error = error
            if size is not None:
                self.done = size
                self.total = size

    def speed(self) -> float | None:
        """Bytes per second over the last few seconds of the transfer."""
        with self._lock:
            if self.state != "downloading" or len(self._samples) < 2:
                return None
            (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else None

    def as_dict(self) -> dict[str, Any]:
        speed = self.speed()
        eta = None
        if speed and self.total is not None:
            eta = round(max(self.total - self.done, 0) / speed, 1)
        return {
            "model": self.model,
            "file": self.file,
            "state": self.state,
            "bytes_done": self.done,
            "bytes_total": self.total,
            "speed_bytes_per_second": round(speed) if speed is not None else None,
            "eta_seconds": eta,
            "error": self.error,
        }


class _Bar:
    """What huggingface_hub's ``http_get`` drives as its progress bar (``tqdm_class(total=, initial=, ...)``)."""

    def __init__(self, progress: FileProgress, cancel: threading.Event, display: DisplayFactory | None, **kw: Any):
        self._progress = progress
        self._cancel = cancel
        total, initial = kw.get("total"), int(kw.get("initial") or 0)
        progress.begin(total, initial)
        self._display = display(progress.file, total, initial) if display is not None else None

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float | None = 1) -> None:
        self._progress.advance(int(n or 0))
        if self._display is not None:
            self._display.update(int(n or 0))
        if self._cancel.is_set():
            raise DownloadCancelled(f"download of {self._progress.file} cancelled")

    def close(self) -> None:
        if self._display is not None:
            self._display.close()
            self._display = None


def _bar_class(progress: FileProgress, cancel: threading.Event, display: DisplayFactory | None) -> Any:
    def make(**kw: Any) -> _Bar:
        return _Bar(progress, cancel, display, **kw)

    return make


def _silent_bars() -> type:
    """A tqdm class that shows nothing, for snapshot_download's own aggregate bars."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Silent(hf_tqdm):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


# ------------------------------------------------------------------------------------------ fetching


@dataclass
class Hub:
    """huggingface_hub, configured once: the cache, the endpoint, offline mode and the default token."""

    cache_dir: Path
    endpoint: str | None = None  # None: huggingface_hub's own (HF_ENDPOINT at its import, else the Hub)
    offline: bool = False

    def fetch(
        self,
        model_id: str,
        source: Source,
        *,
        token: str | None,
        progress: Callable[[str, int | None], FileProgress],
        cancel: threading.Event,
        display: DisplayFactory | None = None,
        sha256: str | None = None,
    ) -> Path:
        """Download (or find in the cache) a model's file or folder and return its path. Blocks.

        ``progress(file, size)`` registers a file's progress record. Raises DownloadFailed with a
        user-facing message, or DownloadCancelled."""
        try:
            if source.kind == "file":
                path = self._fetch_file(source, source.file or "", token, progress, cancel, display)
                if sha256 is not None:
                    verify_sha256(path, sha256, progress(source.file or "", None), delete=True)
                return path
            return self._fetch_folder(source, token, progress, cancel, display)
        except (DownloadFailed, DownloadCancelled):
            raise
        except Exception as exc:
            raise DownloadFailed(self._explain(source, exc)) from exc

    def _fetch_file(
        self,
        source: Source,
        file: str,
        token: str | None,
        progress: Callable[[str, int | None], FileProgress],
        cancel: threading.Event,
        display: DisplayFactory | None,
        revision: str | None = None,
    ) -> Path:
        from huggingface_hub import hf_hub_download

        record = progress(file, None)
        if cancel.is_set():
            raise DownloadCancelled(f"download of {file} cancelled")
        try:
            path = hf_hub_download(
                source.repo or "",
                file,
                revision=revision or source.revision,
                cache_dir=self.cache_dir,
                endpoint=source.endpoint or self.endpoint,
                token=token,
                local_files_only=self.offline,
                tqdm_class=_bar_class(record, cancel, display),
            )
        except DownloadCancelled:
            record.finish("cancelled")
            raise
        except Exception as exc:
            message = self._explain(source, exc, file)
            record.finish("failed", error=message)
            raise DownloadFailed(message) from exc
        result = Path(path)
        record.finish("done", size=result.stat().st_size)
        return result

    def _fetch_folder(
        self,
        source: Source,
        token: str | None,
        progress: Callable[[str, int | None], FileProgress],
        cancel: threading.Event,
        display: DisplayFactory | None,
    ) -> Path:
        from huggingface_hub import snapshot_download

        if not self.offline:
            commit, files = self._list_folder(source, token)
            for name, size in files:
                progress(name, size)
            for name, _ in files:
                self._fetch_file(source, name, token, progress, cancel, display, revision=commit)
        # Every file is in the cache now: this writes the branch ref and huggingface_hub's tree listing
        # (what offline mode needs to trust the folder is complete) and returns the snapshot folder.
        folder = snapshot_download(
            source.repo or "",
            revision=source.revision,
            allow_patterns=list(source.allow_patterns) if source.allow_patterns is not None else None,
            cache_dir=self.cache_dir,
            endpoint=source.endpoint or self.endpoint,
            token=token,
            local_files_only=self.offline,
            tqdm_class=_silent_bars(),
        )
        return Path(folder)

    def _list_folder(self, source: Source, token: str | None) -> tuple[str, list[tuple[str, int]]]:
        """The commit a revision points to and the (path, size) of the files the patterns select."""
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile

        api = HfApi(endpoint=source.endpoint or self.endpoint, token=token)
        commit = api.repo_info(source.repo or "", revision=source.revision).sha
        if not commit:
            raise DownloadFailed(f"{source.describe()}: the Hub did not say which commit {source.revision} is")
        files = []
        for entry in api.list_repo_tree(source.repo or "", revision=commit, recursive=True):
            if not isinstance(entry, RepoFile):
                continue
            try:
                check_repo_path(entry.path, "listing")
            except SourceError as exc:
                raise DownloadFailed(f"{source.describe()}: refusing a file the Hub listed: {exc.message}") from None
            if _selected(source, entry.path):
                files.append((entry.path, int(entry.size or 0)))
        if not files:
            raise DownloadFailed(f"{source.describe()}: no file in the repository matches allow_patterns")
        return commit, sorted(files)

    def _explain(self, source: Source, exc: BaseException, file: str | None = None) -> str:
        """A user-facing sentence for a huggingface_hub or network error."""
        from huggingface_hub import errors

        where = f"{source.repo}/{file}@{source.revision}" if file else source.describe()
        endpoint = source.endpoint or self.endpoint or "the Hugging Face Hub"
        if isinstance(exc, errors.GatedRepoError):
            return f"{source.repo} is gated: set a token (HF_TOKEN or token:) with access to it"
        if isinstance(exc, errors.RepositoryNotFoundError):
            return f"repository {source.repo} not found on {endpoint} (or private: set a token)"
        if isinstance(exc, errors.RevisionNotFoundError):
            return f"revision {source.revision} not found in {source.repo}"
        if isinstance(exc, errors.LocalEntryNotFoundError):  # a subclass of EntryNotFoundError: first
            why = "offline mode is on" if self.offline else f"{endpoint} could not be reached"
            return f"{where} is not in the cache and {why}"
        if isinstance(exc, errors.EntryNotFoundError):
            return f"{where} not found on {endpoint}"
        detail = str(exc).split("\n", 1)[0] or type(exc).__name__
        return f"downloading {where} from {endpoint} failed: {type(exc).__name__}: {detail}"


# ------------------------------------------------------------------------------------------ verifying


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str, record: FileProgress | None = None, *, delete: bool) -> None:
    """Raise DownloadFailed naming both hashes when ``path`` does not match; ``delete`` removes the bad
    file (a cache entry: its snapshot link and the blob behind it) so the next attempt downloads again."""
    if record is not None:
        record.finish("verifying")
    actual = file_sha256(path)
    if actual == expected.lower():
        if record is not None:
            record.finish("done", size=path.stat().st_size)
        return
    message = f"{path.name} failed verification: expected sha256 {expected.lower()}, got {actual}"
    if delete:
        remove_cached_file(path)
        message += "; the file was deleted and the next request downloads it again"
    if record is not None:
        record.finish("failed", error=message)
    raise DownloadFailed(message)


def remove_cached_file(path: Path) -> None:
    blob = path.resolve()
    path.unlink(missing_ok=True)
    if blob != path:
        blob.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ cache


@dataclass(frozen=True)
class CacheState:
    state: str  # cached, missing, local, none
    size: int | None = None
    files: int = 0
    path: Path | None = None


def _cached_files(cache_dir: Path, source: Source) -> list[Any]:
    """huggingface_hub's CachedFileInfo entries of ``source`` in every cached revision."""
    from huggingface_hub import scan_cache_dir

    if not cache_dir.is_dir():
        return []
    info = scan_cache_dir(cache_dir)
    found = []
    for repo in info.repos:
        if repo.repo_id != source.repo or repo.repo_type != "model":
            continue
        for revision in repo.revisions:
            for entry in revision.files:
                name = entry.file_path.relative_to(revision.snapshot_path).as_posix()
                if _selected(source, name):
                    found.append(entry)
    return found


def _selected(source: Source, name: str) -> bool:
    """Is ``name`` part of the source: its file, or a folder file the patterns select (as snapshot_download
    selects them)?"""
    from huggingface_hub.utils import filter_repo_objects

    if source.kind == "file":
        return name == source.file
    patterns = list(source.allow_patterns) if source.allow_patterns is not None else None
    return bool(list(filter_repo_objects([name], allow_patterns=patterns)))


def cache_state(cache_dir: Path, source: Source) -> CacheState:
    """What the cache holds of a Hub source, without any network request."""
    if source.kind == "none":
        return CacheState("none")
    if source.kind == "location":
        path = source.location
        exists = path is not None and path.exists()
        return CacheState("local" if exists else "missing", _size(path) if exists and path else None, path=path)
    entries = _cached_files(cache_dir, source)
    if not entries:
        return CacheState("missing")
    blobs = {e.blob_path: e.size_on_disk for e in entries}
    path = entries[0].file_path
    while source.kind == "folder" and path.parent.name != "snapshots":  # the folder is snapshots/COMMIT
        path = path.parent
    return CacheState("cached", sum(blobs.values()), len(entries), path)


def remove_cached(cache_dir: Path, source: Source) -> int:
    """Delete a Hub source's files from the cache (every revision); blobs other files use are kept.
    Returns the bytes freed. Never called for a ``location``."""
    from huggingface_hub import scan_cache_dir

    entries = _cached_files(cache_dir, source)
    if not entries:
        return 0
    strategy = scan_cache_dir(cache_dir).delete_files(*entries)
    strategy.execute()
    return strategy.expected_freed_size


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
