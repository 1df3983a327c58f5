"""Pieces every wire schema shares."""

from __future__ import annotations

import secrets
from typing import Any

from pydantic import BaseModel, ConfigDict

from lllmsd import __version__


class WireRequest(BaseModel):
    """A request body. Unknown fields are refused (as OpenAI does), so nothing is silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def response_id(prefix: str, instance_id: str | None = None) -> str:
    """``chatcmpl-<instance>-<random>``: the instance id lets a client see which cache served it."""
    middle = f"{instance_id}-" if instance_id else ""
    return f"{prefix}-{middle}{secrets.token_hex(6)}"


def system_fingerprint(engine: str) -> str:
    return f"lllmsd-{__version__}-{engine}"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
