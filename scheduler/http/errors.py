"""The one place where pdorch error codes become HTTP statuses and OpenAI-shaped error JSON."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from transport.errors import ErrorCode, PdorchError

# code -> (HTTP status, OpenAI error "type")
_STATUS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.INVALID_REQUEST: (400, "invalid_request_error"),
    ErrorCode.PROMPT_TOO_LONG: (400, "invalid_request_error"),
    ErrorCode.MODEL_NOT_FOUND: (404, "invalid_request_error"),
    ErrorCode.UNAUTHORIZED: (401, "authentication_error"),
    ErrorCode.NOT_FOUND: (404, "invalid_request_error"),
    ErrorCode.METHOD_NOT_ALLOWED: (405, "invalid_request_error"),
    ErrorCode.QUEUE_FULL: (429, "rate_limit_error"),
    ErrorCode.NO_WORKER: (503, "service_unavailable"),
    ErrorCode.WORKER_LOST: (503, "service_unavailable"),
    ErrorCode.OUT_OF_BLOCKS: (503, "service_unavailable"),
    ErrorCode.KV_REJECTED: (503, "service_unavailable"),
    # A handoff that failed its integrity check is the server's fault and safe to retry.
    ErrorCode.KV_CORRUPT: (503, "service_unavailable"),
    ErrorCode.KV_TRUNCATED: (503, "service_unavailable"),
    ErrorCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    ErrorCode.KV_TIMEOUT: (504, "timeout_error"),
}
# Seconds a client should wait before retrying a capacity error.
RETRY_AFTER_S = 1


def status_of(code: ErrorCode) -> int:
    return _STATUS.get(code, (500, ""))[0]


def error_body(err: PdorchError) -> dict[str, Any]:
    _status, kind = _STATUS.get(err.code, (500, "server_error"))
    return {"error": {"message": err.message, "type": kind, "code": str(err.code), "param": None}}


def error_response(err: PdorchError) -> web.Response:
    status = status_of(err.code)
    retry_after = getattr(err, "retry_after_s", RETRY_AFTER_S)
    headers = {"Retry-After": str(max(1, round(retry_after)))} if status in (429, 503) else None
    return web.json_response(error_body(err), status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except PdorchError as e:
        return error_response(e)
    except web.HTTPNotFound:
        return error_response(PdorchError(ErrorCode.NOT_FOUND, f"no route {request.method} {request.path}"))
    except web.HTTPMethodNotAllowed as e:
        allowed = ", ".join(sorted(e.allowed_methods))
        message = f"{request.method} is not allowed on {request.path} (allowed: {allowed})"
        return error_response(PdorchError(ErrorCode.METHOD_NOT_ALLOWED, message))
