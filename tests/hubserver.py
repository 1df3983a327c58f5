"""A local HTTP server that answers like the Hugging Face Hub, for the model store's tests.

It serves small files from memory at the URLs huggingface_hub asks for (``HF_ENDPOINT`` or the
``endpoint=`` a ModelStore is given):
  HEAD/GET /{org}/{name}/resolve/{revision}/{path}   ETag, X-Repo-Commit, Content-Length, Range -> 206
  GET /api/models/{org}/{name}/revision/{revision}    repo info with the commit sha (snapshot_download)
  GET /api/models/{org}/{name}/tree/{revision}[/...]  the file listing (snapshot_download)
Each file can be told to misbehave: ``hold_after`` bytes then wait for its ``gate`` (a slow download the
test releases; no sleeping), ``cut_after`` bytes then drop the connection (``cuts`` times), or
``corrupt`` (same length, wrong bytes). ``requests`` logs what was asked, Range headers included.

``hub_environment(monkeypatch)`` points huggingface_hub at plain HTTP and makes its transfers
observable at test sizes: progress in 1 KiB chunks instead of 10 MiB, no Xet, and no 1-second pause
before it resumes a cut download (huggingface_hub's own retry back-off; time is not what these tests
are about).
"""

from __future__ import annotations

import asyncio
import hashlib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

CHUNK = 1024


@dataclass
class HubFile:
    data: bytes
    hold_after: int | None = None
    cut_after: int | None = None
    cuts: int = 0
    corrupt: bool = False
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)  # a GET is sending this file's body

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def served(self) -> bytes:
        if not self.corrupt:
            return self.data
        return bytes(b ^ 0xFF for b in self.data[:16]) + self.data[16:]

    def heal(self) -> None:
        """Behave from now on: no holding, no cutting, no corruption."""
        self.hold_after = None
        self.cut_after = None
        self.cuts = 0
        self.corrupt = False
        self.gate.set()


@dataclass
class HubRepo:
    commit: str
    files: dict[str, HubFile] = field(default_factory=dict)
    extra_listing: list[str] = field(default_factory=list)  # paths the tree lists but cannot serve


@dataclass(frozen=True)
class Logged:
    method: str
    path: str
    range: str | None
    authorization: str | None


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[Logged] = []

    def add(self, repo: str, path: str, data: bytes) -> HubFile:
        entry = self.repos.setdefault(repo, HubRepo(hashlib.sha1(repo.encode()).hexdigest()))
        hub_file = entry.files[path] = HubFile(data)
        return hub_file

    def gets(self, path: str) -> list[Logged]:
        return [r for r in self.requests if r.method == "GET" and r.path.endswith(f"/{path}")]

    def release_all(self) -> None:
        for repo in self.repos.values():
            for hub_file in repo.files.values():
                hub_file.gate.set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{org}/{name}/resolve/{revision}/{path:.+}", self._resolve)  # HEAD too
        app.router.add_get("/api/models/{org}/{name}/revision/{revision}", self._info)
        app.router.add_get("/api/models/{org}/{name}/tree/{revision}", self._tree)
        app.router.add_get("/api/models/{org}/{name}/tree/{revision}/{path:.+}", self._tree)
        return app

    # ------------------------------------------------------------------------------------ handlers

    def _repo(self, request: web.Request) -> HubRepo:
        self.requests.append(
            Logged(request.method, request.path, request.headers.get("Range"), request.headers.get("Authorization"))
        )
        repo = self.repos.get(f"{request.match_info['org']}/{request.match_info['name']}")
        if repo is None:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RepoNotFound"}, text="Repository not found")
        if request.match_info["revision"] not in ("main", repo.commit):
            raise web.HTTPNotFound(headers={"X-Error-Code": "RevisionNotFound"}, text="Revision not found")
        return repo

    async def _info(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        name = f"{request.match_info['org']}/{request.match_info['name']}"
        siblings = [{"rfilename": p} for p in [*repo.files, *repo.extra_listing]]
        return web.json_response({"id": name, "modelId": name, "sha": repo.commit, "siblings": siblings})

    async def _tree(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        listing = [
            {"type": "file", "oid": f.sha256[:40], "size": len(f.data), "path": p} for p, f in repo.files.items()
        ]
        listing += [{"type": "file", "oid": "0" * 40, "size": 1, "path": p} for p in repo.extra_listing]
        return web.json_response(listing)

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        repo = self._repo(request)
        hub_file = repo.files.get(request.match_info["path"])
        if hub_file is None:
            raise web.HTTPNotFound(
                headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit}, text="Entry not found"
            )
        headers = {"ETag": f'"{hub_file.sha256}"', "X-Repo-Commit": repo.commit, "Accept-Ranges": "bytes"}
        size = len(hub_file.data)
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(size)})
        start = _range_start(request.headers.get("Range"))
        response = web.StreamResponse(status=206 if start else 200, headers=headers)
        if start:
            response.headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        response.content_length = size - start
        await response.prepare(request)
        await self._send(request, response, hub_file, start)
        return response

    async def _send(self, request: web.Request, response: web.StreamResponse, hub_file: HubFile, start: int) -> None:
        body = hub_file.served()
        if hub_file.cut_after is not None and hub_file.cuts > 0 and start < hub_file.cut_after:
            hub_file.cuts -= 1
            await response.write(body[start : hub_file.cut_after])
            hub_file.started.set()
            assert request.transport is not None
            request.transport.close()  # the peer sees the body end early: a cut connection
            raise asyncio.CancelledError
        if hub_file.hold_after is not None and start < hub_file.hold_after:
            await response.write(body[start : hub_file.hold_after])
            hub_file.started.set()
            await hub_file.gate.wait()
            start = hub_file.hold_after
        hub_file.started.set()
        for offset in range(start, len(body), CHUNK):
            await response.write(body[offset : offset + CHUNK])
        await response.write_eof()


def _range_start(header: str | None) -> int:
    if not header or not header.startswith("bytes="):
        return 0
    first = header[len("bytes=") :].split("-", 1)[0]
    return int(first) if first.isdigit() else 0


def hub_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain HTTP to the fake hub, small progress chunks, no resume back-off, no ambient token/offline."""
    from huggingface_hub import constants, file_download

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(file_download, "time", types.SimpleNamespace(sleep=lambda seconds: None))
    for name in ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


async def start_hub(aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[FakeHub, str]:
    """A running fake hub and its endpoint URL, with huggingface_hub set up to talk to it."""
    hub_environment(monkeypatch)
    hub = FakeHub()
    server = await aiohttp_server(hub.app())
    return hub, str(server.make_url("")).rstrip("/")


def files_under(root: Path, pattern: str = "*", *, size: int | None = None) -> list[Path]:
    """Files (links included) under ``root`` matching ``pattern``, optionally of one size."""
    return [p for p in root.rglob(pattern) if size is None or (p.is_file() and p.stat().st_size == size)]


def payload(size: int, seed: str = "lllmsd") -> bytes:
    """Deterministic bytes of a given size (a stand-in for weights)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])
