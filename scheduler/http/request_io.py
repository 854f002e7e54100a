"""Reading a request: its client's tenant (from the bearer key) and its typed JSON body, bounded
in size (decompressed too), time and nesting."""

from __future__ import annotations

import asyncio
import zlib
from typing import TypeVar

from aiohttp import hdrs, web

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


def _too_large(limit: int) -> PdorchError:
    return PdorchError(ErrorCode.REQUEST_TOO_LARGE, f"request body exceeds {limit} bytes")


async def _read(request: web.Request, limit: int, timeout_s: float) -> bytes:
    """The body as sent (at most ``limit`` bytes: aiohttp's ``client_max_size``), within ``timeout_s``."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
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
        raise _too_large(limit) from None
    except Exception as e:  # a truncated upload
        raise bad(f"cannot read request body: {e}") from None


# Content-Encoding -> zlib's window bits for it (gzip's header and trailer; zlib's).
_ZLIB_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def decoded(body: bytes, encoding: str, limit: int) -> bytes:
    """``body`` without its Content-Encoding: gzip, deflate (zlib's format, or raw deflate as some
    clients send it) or identity; at most ``limit`` bytes once decompressed, found out without
    decompressing more than that (a small body may inflate to gigabytes)."""
    coding = encoding.strip().lower()
    if coding in ("", "identity"):
        return body
    wbits = _ZLIB_WBITS.get(coding)
    if wbits is None:
        raise PdorchError(
            ErrorCode.UNSUPPORTED_ENCODING,
            f"Content-Encoding {encoding.strip()!r} is not supported: send gzip, deflate or identity",
        )
    if coding == "deflate" and body[:1] and body[0] & 0x0F != 8:
        wbits = -zlib.MAX_WBITS  # no zlib header: raw deflate
    inflate = zlib.decompressobj(wbits)
    try:
        out = inflate.decompress(body, limit + 1)
    except zlib.error:
        raise bad(f"request body is not valid {coding} data") from None
    if len(out) > limit or inflate.unconsumed_tail:
        raise _too_large(limit)
    if not inflate.eof:
        raise bad(f"request body is not valid {coding} data: it ends early")
    return out


async def request_body(request: web.Request, kind: type[_Req]) -> _Req:
    cfg = request.app[CONFIG]
    limit = cfg.max_body_bytes
    raw = await _read(request, limit, cfg.http.body_timeout_s)
    body = decoded(raw, request.headers.get(hdrs.CONTENT_ENCODING, ""), limit)
    return parse_body(body, kind, cfg.http.max_json_depth)
