"""asyncio admission: ``ticket = await gate.acquire(tenant, priority, deadline_s)`` ... ``ticket.release()``.

A request is admitted at once when nobody is waiting and the room check passes; otherwise it waits
in the :class:`~scheduler.admission.queue.FairQueue` (or is refused with ``QUEUE_FULL`` and a
retry-after hint) until the room check passes for it at the head of the queue. The check is the
caller's ("is there a node with room for this request now?"); it is re-evaluated whenever capacity
may have changed: a ticket is released, or the caller calls :meth:`AdmissionGate.notify` (e.g. a
worker reported freed KV). The head blocks the queue while its check fails (no overtaking, so big
requests are not starved by small ones). A waiter whose deadline passes gets ``DEADLINE_EXCEEDED``.

A request costs the sequences it generates (``cost``: a completion's ``n`` choices are ``n``), in its
tenant's fair share and against ``max_inflight``; one costing more than that limit is admitted when
nothing else is in flight.

The check may *be* the decision: whatever truthy value it returns (the scheduler's booked
placement) is handed to the admitted request as ``ticket.grant``, so a request is placed once, at
the instant it is admitted. A check that raises ``PdorchError`` (placement shed the request) fails
that request's ``acquire`` with it; the queue goes on with the next.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from scheduler.admission.policy import AdmissionPolicy
from scheduler.admission.queue import FairQueue
from transport.errors import ErrorCode, PdorchError

# Falsy: no room yet. Anything else admits the request and is handed to it as ``ticket.grant``.
RoomCheck = Callable[[], object]


def _always() -> bool:
    return True


class Ticket:
    """Admission held by one request; release it exactly once when the request ends (idempotent)."""

    def __init__(
        self, gate: AdmissionGate, tenant: str, priority: int, grant: object = True, cost: int = 1
    ) -> None:
        self._gate = gate
        self.tenant = tenant
        self.priority = priority
        self.cost = cost
        self.grant = grant  # what the room check returned when it admitted the request
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._gate._on_release(self.cost)

    async def __aenter__(self) -> Ticket:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class AdmissionGate:
    def __init__(
        self,
        policy: AdmissionPolicy | None = None,
        has_room: RoomCheck = _always,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy or AdmissionPolicy()
        self._queue = FairQueue(self.policy)
        self._has_room = has_room
        self._clock = clock
        self._waiters: dict[int, tuple[asyncio.Future[Ticket], RoomCheck]] = {}
        self.inflight = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def acquire(
        self,
        tenant: str,
        priority: int = 0,
        deadline_s: float = 30.0,
        has_room: RoomCheck | None = None,
        cost: int = 1,
    ) -> Ticket:
        check = has_room or self._has_room
        now = self._clock()
        if not len(self._queue) and self._slot_free(cost) and (grant := check()):
            return self._grant(tenant, priority, now, grant, cost)
        entry = self._queue.push(tenant, priority, now, now + deadline_s, cost)  # may raise QueueFull
        fut: asyncio.Future[Ticket] = asyncio.get_running_loop().create_future()
        self._waiters[entry.ticket] = (fut, check)
        self._pump()
        try:
            done, _ = await asyncio.wait({fut}, timeout=max(0.0, deadline_s))
        except asyncio.CancelledError:
            self._abandon(entry.ticket, fut)
            raise
        if not done:
            self._abandon(entry.ticket, fut)
            raise PdorchError(
                ErrorCode.DEADLINE_EXCEEDED, f"no capacity within {deadline_s:g}s (tenant {tenant!r})"
            )
        return fut.result()

    def notify(self) -> None:
        """Capacity may have changed: admit whoever now fits, in queue order."""
        self._pump()

    def _slot_free(self, cost: int) -> bool:
        limit = self.policy.max_inflight
        return not limit or self.inflight + cost <= limit or not self.inflight

    def _grant(self, tenant: str, priority: int, now: float, grant: object, cost: int) -> Ticket:
        self.inflight += cost
        self._queue.note_admitted(now)
        return Ticket(self, tenant, priority, grant, cost)

    def _pump(self) -> None:
        while True:
            head = self._queue.peek()
            if head is None:
                return
            cost = round(head.cost)  # the queue keeps it as a float
            if not self._slot_free(cost):
                return
            fut, check = self._waiters[head.ticket]
            if fut.done():  # abandoned between wake-ups
                self._queue.remove(head.ticket)
                del self._waiters[head.ticket]
                continue
            try:
                grant = check()
            except PdorchError as e:
                self._queue.remove(head.ticket)
                del self._waiters[head.ticket]
                fut.set_exception(e)
                continue
            if not grant:
                return
            self._queue.pop()
            del self._waiters[head.ticket]
            fut.set_result(self._grant(head.tenant, head.priority, self._clock(), grant, cost))

    def _abandon(self, ticket: int, fut: asyncio.Future[Ticket]) -> None:
        self._waiters.pop(ticket, None)
        self._queue.remove(ticket)
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            fut.result().release()  # granted just as we gave up: hand the capacity back
        else:
            fut.cancel()
        self._pump()

    def _on_release(self, cost: int) -> None:
        self.inflight -= cost
        self._pump()
