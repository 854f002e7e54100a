"""Reading a request: its client's tenant (from the bearer key) and its typed JSON body, bounded
in size, time and nesting."""

from __future__ import annotations

import asyncio
from typing import TypeVar

from aiohttp import web

from scheduler.app_keys import CONFIG
from scheduler.config import SchedulerConfig
from scheduler.http.openai_schema import bad, parse_body
from transport.errors import ErrorCode, PdorchError

_Req = TypeVar("_Req")


def bearer_token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else ""


def client_tenant(request: web.Request, cfg: SchedulerConfig) -> str:
    keys = cfg.api_keys
    token = bearer_token(request)
    if keys and token not in keys:
        raise PdorchError(ErrorCode.UNAUTHORIZED, "missing or invalid API key")
    return token[:12] if keys else ""


async def _read(request: web.Request, limit: int, timeout_s: float) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise bad(f"request body exceeds {limit} bytes")
    try:
        if request.content.is_eof():
            # Already here in full (a small body comes with its headers): nothing to wait for.
            return await request.read()
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        raise PdorchError(
            ErrorCode.REQUEST_TIMEOUT, f"request body not received within {timeout_s:g}s"
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise bad(f"request body exceeds {limit} bytes") from None
    except Exception as e:  # truncated upload, body over aiohttp's client_max_size
        raise bad(f"cannot read request body: {e}") from None


async def request_body(request: web.Request, kind: type[_Req]) -> _Req:
    cfg = request.app[CONFIG]
    raw = await _read(request, cfg.max_body_bytes, cfg.http.body_timeout_s)
    return parse_body(raw, kind, cfg.http.max_json_depth)
