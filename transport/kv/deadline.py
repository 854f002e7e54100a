"""An absolute deadline on the event loop's clock, shared by every wait of one transfer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

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
