"""The one error type of pdorch.

Every failure that crosses a module boundary is a :class:`PdorchError` with a code from
:class:`ErrorCode`. The HTTP status and OpenAI error JSON for each code are decided in exactly
one place (``scheduler/http/errors.py``); nothing else maps codes to statuses.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    # Client mistakes (request-scoped).
    INVALID_REQUEST = "invalid_request"
    MODEL_NOT_FOUND = "model_not_found"
    PROMPT_TOO_LONG = "prompt_too_long"
    UNAUTHORIZED = "unauthorized"
    REQUEST_TIMEOUT = "request_timeout"  # the client did not send its request in time
    REQUEST_TOO_LARGE = "request_too_large"  # a body over the limit (decompressed, if it was)
    UNSUPPORTED_ENCODING = "unsupported_encoding"  # a body in a Content-Encoding we do not read
    NOT_FOUND = "not_found"  # no such route
    METHOD_NOT_ALLOWED = "method_not_allowed"
    # Capacity (request-scoped, retryable).
    QUEUE_FULL = "queue_full"
    NO_WORKER = "no_worker"
    # A worker or the KV plane failed this request (request-scoped).
    WORKER_LOST = "worker_lost"
    JOB_FAILED = "job_failed"
    KV_CORRUPT = "kv_corrupt"
    KV_TRUNCATED = "kv_truncated"
    KV_TIMEOUT = "kv_timeout"
    KV_REJECTED = "kv_rejected"
    # The receiving side has no room for another transfer now (every slot and waiting place
    # taken): it is congested, not broken; the scheduler leaves it out of decode for a while.
    KV_BUSY = "kv_busy"
    # An eager transfer (transport/kv/messages.py) found no room to wait at its receiver: the sender
    # begins it again the usual way (handled inside the KV plane; no request fails with it).
    KV_NOT_READY = "kv_not_ready"
    OUT_OF_BLOCKS = "out_of_blocks"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    # Wire problems (connection- or worker-scoped).
    BAD_MESSAGE = "bad_message"
    PROTOCOL_MISMATCH = "protocol_mismatch"
    CONFIG = "config"
    INTERNAL = "internal"


class PdorchError(Exception):
    """A failure with a machine-readable code and a message meant for a human."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
