"""Server-sent events in the shape OpenAI clients read: ``data: <json>`` events, then ``[DONE]``."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

_ENCODE = msgspec.json.Encoder().encode


async def open_stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(
        status=200,
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            # Stop reverse proxies (nginx) from buffering the stream.
            "X-Accel-Buffering": "no",
        },
    )
    await resp.prepare(request)
    return resp


async def send_event(resp: web.StreamResponse, payload: Any) -> None:
    await resp.write(b"data: " + _ENCODE(payload) + b"\n\n")


async def send_done(resp: web.StreamResponse) -> None:
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
