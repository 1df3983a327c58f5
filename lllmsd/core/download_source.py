"""Where a model's weights come from: parsing ``url:`` links and refusing names that could escape the cache.

Pure functions with no huggingface_hub import, so config validation (``lllmsd config check``) and the
store share one set of rules. A repo id, revision or file name ends up in a filesystem path inside the
cache (``models--ORG--NAME/snapshots/REV/FILE``, ``refs/REV``): anything that could climb out of it is
refused here, before any request is made.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

DEFAULT_REVISION = "main"
# Hosts whose links are plain Hub links: they are fetched through the configured endpoint (HF_ENDPOINT),
# so an lllms config keeps working behind a mirror. A link to any other host names its own endpoint.
HUB_HOSTS = frozenset({"huggingface.co", "www.huggingface.co", "hf.co"})

_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")
_REVISION = re.compile(r"^[A-Za-z0-9._/-]{1,255}$")
_URL_PATH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/(?:resolve|blob)/(?P<revision>[^/]+)/(?P<file>.+)$")


class SourceError(ValueError):
    """A source that must not be used; the message names the field and the problem."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Source:
    """One model's weights. ``kind`` is "none" (fake models), "location", "file" or "folder"."""

    kind: str
    repo: str | None = None
    revision: str = DEFAULT_REVISION
    file: str | None = None
    allow_patterns: tuple[str, ...] | None = None
    location: Path | None = None
    endpoint: str | None = None  # from a url: link to a non-Hub host; None = the store's endpoint

    def describe(self) -> str:
        if self.kind == "location":
            return f"location {self.location}"
        if self.kind == "file":
            return f"{self.repo}/{self.file}@{self.revision}"
        if self.kind == "folder":
            patterns = f" [{', '.join(self.allow_patterns)}]" if self.allow_patterns else ""
            return f"{self.repo}@{self.revision}{patterns}"
        return "no weights"


def check_repo_id(repo: str, field: str = "repo") -> str:
    if ".." in repo or "--" in repo or not _REPO_ID.match(repo):
        raise SourceError(field, f"{repo!r} is not a Hub repository id (ORG/NAME: letters, digits, . _ -)")
    return repo


def check_revision(revision: str, field: str = "revision") -> str:
    parts = revision.split("/")
    if not _REVISION.match(revision) or any(p in ("", ".", "..") for p in parts):
        raise SourceError(field, f"{revision!r} is not a branch, tag or commit name")
    return revision


def check_repo_path(path: str, field: str = "file") -> str:
    """A file inside a repo: relative, forward slashes, no ``.``/``..`` parts, no control characters."""
    bad = (
        not path
        or path.startswith("/")
        or "\\" in path
        or any(ord(c) < 32 for c in path)
        or any(p in ("", ".", "..") for p in path.split("/"))
    )
    if bad:
        raise SourceError(field, f"{path!r} is not a relative file path inside the repository")
    return path


def parse_hub_url(url: str) -> tuple[str | None, str, str, str]:
    """``https://HOST/ORG/REPO/resolve/REV/PATH`` -> (endpoint or None for Hub hosts, repo, revision, path)."""
    parts = urlsplit(url)
    match = _URL_PATH.match(parts.path)
    if parts.scheme not in ("http", "https") or not parts.netloc or match is None or parts.query or parts.fragment:
        raise SourceError("url", "must look like https://huggingface.co/ORG/REPO/resolve/REVISION/PATH")
    repo = check_repo_id(unquote(match["repo"]), "url")
    revision = check_revision(unquote(match["revision"]), "url")
    file = check_repo_path(unquote(match["file"]), "url")
    host = parts.hostname or ""
    endpoint = None if host.lower() in HUB_HOSTS else f"{parts.scheme}://{parts.netloc}"
    return endpoint, repo, revision, file


def source_of(config: Any) -> Source:
    """The validated source of a model config (any engine's); raises SourceError."""
    if config.location is not None:
        return Source("location", location=config.location)
    if config.url is not None:
        endpoint, repo, revision, file = parse_hub_url(config.url)
        return Source("file", repo=repo, revision=revision, file=file, endpoint=endpoint)
    if config.repo is None:
        return Source("none")
    repo = check_repo_id(config.repo)
    revision = check_revision(config.revision or DEFAULT_REVISION)
    if config.file is not None:
        return Source("file", repo=repo, revision=revision, file=check_repo_path(config.file))
    patterns = tuple(config.allow_patterns) if config.allow_patterns is not None else None
    for pattern in patterns or ():
        check_repo_path(pattern, "allow_patterns")
    return Source("folder", repo=repo, revision=revision, allow_patterns=patterns)
