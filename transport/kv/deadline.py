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
            return await asyncio.wait_for(aw, self.remaining())
        except TimeoutError:
            raise PdorchError(ErrorCode.KV_TIMEOUT, f"timed out waiting for {what}") from None
