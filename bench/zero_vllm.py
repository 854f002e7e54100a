"""A zero-compute stand-in for a vLLM server, for measuring routers and schedulers alone.

Answers ``/v1/completions`` (and chat) at once with ``max_tokens`` tokens, streamed or not, with
``kv_transfer_params`` in the answer as vLLM's NIXL connector gives them to a P/D proxy, plus the
few GET endpoints routers probe (``/health``, ``/v1/models``, ``/metrics``...). No model, no KV.

Run: ``python bench/zero_vllm.py PORT``.
"""

from __future__ import annotations

import json
import sys

from aiohttp import web

_TOKEN = 97  # "a"
_KV_PARAMS = {
    "do_remote_prefill": True,
    "remote_engine_id": "zero",
    "remote_block_ids": [0],
    "remote_host": "127.0.0.1",
    "remote_port": 1,
}


def _chunk(final: bool) -> bytes:
    choice = {"index": 0, "text": "a", "token_ids": [_TOKEN], "finish_reason": "length" if final else None}
    body = {"id": "zero", "object": "text_completion", "created": 0, "model": "zero", "choices": [choice]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


_STEP, _LAST = _chunk(False), _chunk(True)


async def completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    n = max(1, int(body.get("max_tokens") or 16))
    if body.get("stream"):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_STEP * (n - 1) + _LAST + b"data: [DONE]\n\n")
        return resp
    choice = {"index": 0, "text": "a" * n, "token_ids": [_TOKEN] * n, "finish_reason": "length"}
    return web.json_response(
        {
            "id": "zero",
            "object": "text_completion",
            "created": 0,
            "model": "zero",
            "choices": [choice],
            "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1},
            "kv_transfer_params": _KV_PARAMS,
        }
    )


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "zero", "object": "model"}]})


async def empty(request: web.Request) -> web.Response:
    return web.json_response({})


def main() -> None:
    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_route("*", "/{tail:.*}", empty)  # health, metrics, server info: whatever is probed
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
