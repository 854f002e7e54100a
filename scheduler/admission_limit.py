"""Bounded admission: at most ``max_running`` requests run; up to ``max_queued`` wait, FIFO.

Beyond that a request is refused at once (QUEUE_FULL -> HTTP 429 with Retry-After); a waiting
request gives up after ``timeout_s`` the same way. Waiters are woken in arrival order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

from transport.errors import ErrorCode, PdorchError


class AdmissionLimit:
    def __init__(self, max_running: int, max_queued: int, timeout_s: float) -> None:
        self.max_running = max_running
        self.max_queued = max_queued
        self.timeout_s = timeout_s
        self.running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self.running < self.max_running and not self._waiters:
            self.running += 1
            return
        if len(self._waiters) >= self.max_queued:
            raise PdorchError(ErrorCode.QUEUE_FULL, "the admission queue is full; retry later")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(fut, self.timeout_s)
        except TimeoutError:
            raise PdorchError(
                ErrorCode.QUEUE_FULL, f"no capacity within {self.timeout_s:.0f}s; retry later"
            ) from None
        except BaseException:
            if fut.done() and not fut.cancelled():
                self._release()  # we were granted a slot but are leaving: pass it on
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(fut)

    def _release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot moves to the waiter; running stays the same
                return
        self.running -= 1
