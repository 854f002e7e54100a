"""A small asyncio client for the parts of vLLM's OpenAI-compatible HTTP API pdorch uses.

Completions with token-id prompts (``/v1/completions`` accepts a list of ids), plain and streamed
(server-sent events), plus ``/health``, ``/metrics`` and ``/v1/models``. Every HTTP failure becomes
a :class:`PdorchError`: 4xx -> ``INVALID_REQUEST`` (vLLM refused the request itself), anything else
-> ``JOB_FAILED``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from transport.errors import ErrorCode, PdorchError

_SSE_DATA = b"data:"
# vLLM's HTTP server (uvicorn) closes a connection idle for 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE);
# aiohttp would keep it 15 s. A request sent on a connection the server is closing at that moment
# fails as "Server disconnected" though vLLM is fine, so idle connections are dropped first here.
KEEPALIVE_S = 4.0


def _error_text(payload: Any) -> str:
    if isinstance(payload, dict):
        err = payload.get("error", payload)
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err)
    return str(payload)


def _status_error(status: int, body: str) -> PdorchError:
    try:
        message = _error_text(json.loads(body))
    except ValueError:
        message = body[:500]
    code = ErrorCode.INVALID_REQUEST if 400 <= status < 500 else ErrorCode.JOB_FAILED
    return PdorchError(code, f"vLLM answered {status}: {message}")


class VllmClient:
    """One HTTP connection pool to one vLLM server. Create inside a running event loop."""

    def __init__(
        self, url: str, *, request_timeout_s: float = 300.0, keepalive_s: float = KEEPALIVE_S
    ) -> None:
        """``keepalive_s``: how long an idle connection may be reused; keep it below the server's."""
        self.url = url.rstrip("/")
        self.request_timeout_s = request_timeout_s
        # No pool limit: decode streams are long-lived and must not queue behind each other.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=keepalive_s)
        )

    async def close(self) -> None:
        await self._session.close()

    def _timeout(self, total_s: float | None) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=total_s if total_s is not None else self.request_timeout_s)

    async def get_text(self, path: str, *, timeout_s: float = 10.0) -> tuple[int, str]:
        try:
            async with self._session.get(self.url + path, timeout=self._timeout(timeout_s)) as resp:
                return resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise PdorchError(ErrorCode.JOB_FAILED, f"vLLM at {self.url} unreachable: {e!r}") from None

    async def health(self, *, timeout_s: float = 5.0) -> bool:
        status, _ = await self.get_text("/health", timeout_s=timeout_s)
        return status == 200

    async def metrics_text(self, *, timeout_s: float = 10.0) -> str:
        status, text = await self.get_text("/metrics", timeout_s=timeout_s)
        if status != 200:
            raise _status_error(status, text)
        return text

    async def models(self) -> list[dict[str, Any]]:
        status, text = await self.get_text("/v1/models")
        if status != 200:
            raise _status_error(status, text)
        data = json.loads(text).get("data", [])
        return [m for m in data if isinstance(m, dict)]

    async def post_json(self, path: str, body: dict[str, Any], *, timeout_s: float = 60.0) -> str:
        """POST ``body``; the answer's text. Raises PdorchError for a non-200 answer."""
        try:
            async with self._session.post(
                self.url + path, json=body, timeout=self._timeout(timeout_s)
            ) as resp:
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise PdorchError(ErrorCode.JOB_FAILED, f"vLLM at {self.url} unreachable: {e!r}") from None
        if resp.status != 200:
            raise _status_error(resp.status, text)
        return text

    async def complete(
        self, body: dict[str, Any], *, request_id: str, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """A non-streamed completion; returns the response JSON."""
        try:
            async with self._session.post(
                self.url + "/v1/completions",
                json={**body, "stream": False},
                headers={"X-Request-Id": request_id},
                timeout=self._timeout(timeout_s),
            ) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise _status_error(resp.status, text)
                return json.loads(text)
        except TimeoutError:
            raise PdorchError(
                ErrorCode.DEADLINE_EXCEEDED, f"vLLM did not answer {request_id} in time"
            ) from None
        except aiohttp.ClientError as e:
            raise PdorchError(ErrorCode.JOB_FAILED, f"vLLM request {request_id} failed: {e!r}") from None

    async def stream(
        self, body: dict[str, Any], *, request_id: str, timeout_s: float | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """A streamed completion: yields each event's JSON until ``[DONE]``.

        An ``{"error": ...}`` event (vLLM's way to fail a stream after the 200) raises
        ``JOB_FAILED``. Closing the generator closes the connection, which makes vLLM abort the
        request and free its blocks.
        """
        try:
            async with self._session.post(
                self.url + "/v1/completions",
                json={**body, "stream": True},
                headers={"X-Request-Id": request_id},
                timeout=self._timeout(timeout_s),
            ) as resp:
                if resp.status != 200:
                    raise _status_error(resp.status, await resp.text())
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(_SSE_DATA):
                        continue
                    data = line[len(_SSE_DATA) :].strip()
                    if data == b"[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:
                        raise PdorchError(
                            ErrorCode.JOB_FAILED, f"vLLM failed {request_id}: {_error_text(event)}"
                        )
                    yield event
        except TimeoutError:
            raise PdorchError(
                ErrorCode.DEADLINE_EXCEEDED, f"vLLM did not finish {request_id} in time"
            ) from None
        except aiohttp.ClientError as e:
            raise PdorchError(ErrorCode.JOB_FAILED, f"vLLM stream {request_id} failed: {e!r}") from None
        raise PdorchError(ErrorCode.JOB_FAILED, f"vLLM stream {request_id} ended without [DONE]")
