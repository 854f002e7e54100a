"""An absolute deadline on the event loop's clock, shared by every wait of one transfer.

A wait on one future can instead have the future failed at the deadline (:meth:`Deadline.fail_at`):
one loop timer, without a timeout scope's bookkeeping around the wait."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from transport.errors import ErrorCode, PdorchError

T = TypeVar("T")


class Deadline:
    def __init__(self, seconds: float) -> None:
        self._loop = asyncio.get_running_loop()
        self.at = self._loop.time() + max(0.0, seconds)

    def remaining(self) -> float:
        return max(0.0, self.at - self._loop.time())

    def expired(self) -> bool:
        return self._loop.time() >= self.at

    async def wait(self, aw: Awaitable[T], what: str) -> T:
        """Await ``aw`` until the deadline; past it, raise ``KV_TIMEOUT`` naming ``what`` we waited for."""
        try:
            # Not wait_for: that wraps ``aw`` in a new task, on the KV plane's per-chunk path.
            async with asyncio.timeout_at(self.at):
                return await aw
        except TimeoutError:
            raise PdorchError(ErrorCode.KV_TIMEOUT, f"timed out waiting for {what}") from None

    def fail_at(self, fut: asyncio.Future[Any], code: ErrorCode, message: str) -> asyncio.TimerHandle:
        """Fail ``fut`` with ``PdorchError(code, message)`` at the deadline unless it is done by
        then; cancel the handle once the wait is over. (The error is made only if it is raised:
        making one costs a microsecond, and most waits end in time.)"""
        return self._loop.call_at(self.at, _fail, fut, code, message)


def _fail(fut: asyncio.Future[Any], code: ErrorCode, message: str) -> None:
    if not fut.done():
        fut.set_exception(PdorchError(code, message))
