"""The one place where pdorch error codes become HTTP statuses and OpenAI-shaped error JSON.

Every error response has that shape, whatever raised it: a :class:`PdorchError`, aiohttp's own
HTTP errors (an unknown path, a wrong method) and anything unexpected (a 500, logged at most once
per interval with its traceback, counted in ``pdorch_http_errors_total`` like the others).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from scheduler.app_keys import METRICS
from scheduler.http.json_body import json_response
from transport.errors import ErrorCode, PdorchError
from transport.rate_limited_log import RateLimitedLog

log = logging.getLogger("pdorch.http")
_unexpected_log = RateLimitedLog(log, level=logging.ERROR)

# code -> (HTTP status, OpenAI error "type")
_STATUS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.INVALID_REQUEST: (400, "invalid_request_error"),
    ErrorCode.PROMPT_TOO_LONG: (400, "invalid_request_error"),
    ErrorCode.MODEL_NOT_FOUND: (404, "invalid_request_error"),
    ErrorCode.UNAUTHORIZED: (401, "authentication_error"),
    ErrorCode.REQUEST_TIMEOUT: (408, "timeout_error"),
    ErrorCode.REQUEST_TOO_LARGE: (413, "invalid_request_error"),
    ErrorCode.UNSUPPORTED_ENCODING: (415, "invalid_request_error"),
    ErrorCode.NOT_FOUND: (404, "invalid_request_error"),
    ErrorCode.METHOD_NOT_ALLOWED: (405, "invalid_request_error"),
    ErrorCode.QUEUE_FULL: (429, "rate_limit_error"),
    ErrorCode.NO_WORKER: (503, "service_unavailable"),
    ErrorCode.WORKER_LOST: (503, "service_unavailable"),
    ErrorCode.OUT_OF_BLOCKS: (503, "service_unavailable"),
    ErrorCode.KV_REJECTED: (503, "service_unavailable"),
    ErrorCode.KV_BUSY: (503, "service_unavailable"),
    ErrorCode.KV_NOT_READY: (503, "service_unavailable"),
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
    return json_response(error_body(err), status=status, headers=headers)


# aiohttp's other errors (a body over client_max_size...) in the same shape, by status.
_HTTP_TYPES = {401: "authentication_error", 429: "rate_limit_error"}


def _http_error(e: web.HTTPException) -> web.Response:
    kind = _HTTP_TYPES.get(e.status, "invalid_request_error" if e.status < 500 else "server_error")
    body = {"error": {"message": e.reason, "type": kind, "code": str(e.status), "param": None}}
    return json_response(body, status=e.status)


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        response = _error_answer(request, e)
    except Exception as e:
        response = _error_answer(request, e)
    if request.content.exception() is not None:
        # The body could not be read (a broken encoding or chunking): where it ends, and so what
        # follows it on the connection, is unknown. Answer, then close.
        response.force_close()
    return response


def _error_answer(request: web.Request, e: Exception) -> web.Response:
    metrics = request.app[METRICS]
    if isinstance(e, PdorchError):
        metrics.http_errors.labels(str(e.code)).inc()
        return error_response(e)
    if isinstance(e, web.HTTPNotFound):
        metrics.http_errors.labels(str(ErrorCode.NOT_FOUND)).inc()
        return error_response(PdorchError(ErrorCode.NOT_FOUND, f"no route {request.method} {request.path}"))
    if isinstance(e, web.HTTPMethodNotAllowed):
        metrics.http_errors.labels(str(ErrorCode.METHOD_NOT_ALLOWED)).inc()
        allowed = ", ".join(sorted(e.allowed_methods))
        message = f"{request.method} is not allowed on {request.path} (allowed: {allowed})"
        response = error_response(PdorchError(ErrorCode.METHOD_NOT_ALLOWED, message))
        response.headers["Allow"] = allowed
        return response
    if isinstance(e, web.HTTPException):
        metrics.http_errors.labels(str(e.status)).inc()
        return _http_error(e)
    metrics.http_errors.labels(str(ErrorCode.INTERNAL)).inc()
    _unexpected_log("unexpected error serving %s %s", request.method, request.path, exc_info=True)
    return error_response(PdorchError(ErrorCode.INTERNAL, "internal error"))
