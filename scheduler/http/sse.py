"""Server-sent events in the shape OpenAI clients read: ``data: <json>`` events, then ``[DONE]``."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from scheduler.http.json_body import encode


class _EventStream(web.StreamResponse):
    # The headers go out with the first events, in one write (aiohttp sends a StreamResponse's at
    # prepare by default): each write is a send on the socket, the dearest part of a short stream.
    _send_headers_immediately = False


async def open_stream(request: web.Request) -> web.StreamResponse:
    resp = _EventStream(
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


def _events(payloads: tuple[Any, ...]) -> bytes:
    return b"".join(b"data: " + encode(p) + b"\n\n" for p in payloads)


async def send_events(resp: web.StreamResponse, *payloads: Any) -> None:
    """Events that go out together in one write."""
    await resp.write(_events(payloads))


async def finish(resp: web.StreamResponse, *payloads: Any) -> None:
    """The last events, ``[DONE]`` and the end of the response, in one write."""
    await resp.write_eof(_events(payloads) + b"data: [DONE]\n\n")
