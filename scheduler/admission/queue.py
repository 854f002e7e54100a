"""The pure core of admission: who goes next, how many may wait, and when to retry.

Ordering: a higher ``priority`` always goes first. Within a priority, tenants share service by
weight with start-time fair queuing at tenant granularity: each tenant with waiting entries has a
virtual start ``max(virtual time, its last finish tag)``; the tenant with the smallest start is
served next, its finish tag advances by ``cost / weight`` and the virtual time moves to that start.
A tenant that sends a burst therefore interleaves with the others instead of starving them, and one
that was idle banks no credit. Within a tenant, entries go first come first served
(``order: fifo``) or earliest deadline first (``order: deadline``).

Bounds: ``max_queued`` in total and ``max_queued_per_tenant``; beyond them :class:`QueueFull`
(``QUEUE_FULL``) carries a retry-after hint: the entries ahead divided by the recent admission rate,
clamped to the policy's range. Time is a number the caller passes in (no clock here).
"""

from __future__ import annotations

import heapq
import math

import msgspec

from scheduler.admission.policy import AdmissionPolicy, QueueOrder
from transport.errors import ErrorCode, PdorchError


class QueueFull(PdorchError):
    """``QUEUE_FULL`` with a hint for the client's Retry-After header."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(ErrorCode.QUEUE_FULL, message)
        self.retry_after_s = retry_after_s


class QueueEntry(msgspec.Struct, frozen=True):
    ticket: int
    tenant: str
    priority: int
    enqueued_at: float
    deadline_at: float
    cost: float


class _TenantQueue:
    __slots__ = ("finish", "heap")

    def __init__(self) -> None:
        self.heap: list[tuple[float, int]] = []  # (order key, ticket)
        self.finish = 0.0  # virtual finish tag of the last entry served


class FairQueue:
    def __init__(self, policy: AdmissionPolicy | None = None) -> None:
        policy = policy or AdmissionPolicy()
        policy.validate()
        self.policy = policy
        self._next_ticket = 1
        self._live: dict[int, QueueEntry] = {}
        self._levels: dict[int, dict[str, _TenantQueue]] = {}  # priority -> tenant -> queue
        self._virtual: dict[int, float] = {}
        self._per_tenant: dict[str, int] = {}
        self._last_admit: float | None = None
        self._admit_interval: float | None = None  # EWMA of seconds between admissions

    def __len__(self) -> int:
        return len(self._live)

    def depth(self, tenant: str) -> int:
        return self._per_tenant.get(tenant, 0)

    def push(
        self, tenant: str, priority: int, now: float, deadline_at: float = math.inf, cost: float = 1.0
    ) -> QueueEntry:
        p = self.policy
        if len(self._live) >= p.max_queued:
            raise QueueFull(f"admission queue full ({p.max_queued} waiting)", self.retry_after_s())
        if p.max_queued_per_tenant and self.depth(tenant) >= p.max_queued_per_tenant:
            raise QueueFull(
                f"tenant {tenant!r} has {p.max_queued_per_tenant} requests waiting",
                self.retry_after_s(tenant),
            )
        if not cost > 0:
            raise PdorchError(ErrorCode.INVALID_REQUEST, f"admission cost must be > 0, got {cost}")
        entry = QueueEntry(self._next_ticket, tenant, priority, now, deadline_at, cost)
        self._next_ticket += 1
        self._live[entry.ticket] = entry
        self._per_tenant[tenant] = self.depth(tenant) + 1
        level = self._levels.setdefault(priority, {})
        self._virtual.setdefault(priority, 0.0)
        tq = level.get(tenant)
        if tq is None:
            tq = level[tenant] = _TenantQueue()
        key = deadline_at if p.order is QueueOrder.DEADLINE else float(entry.ticket)
        heapq.heappush(tq.heap, (key, entry.ticket))
        return entry

    def peek(self) -> QueueEntry | None:
        chosen = self._choose()
        return None if chosen is None else self._live[chosen[1].heap[0][1]]

    def pop(self, now: float | None = None) -> QueueEntry:
        """Remove and return the head; with ``now``, count it as an admission for the retry hint."""
        chosen = self._choose()
        if chosen is None:
            raise PdorchError(ErrorCode.INTERNAL, "pop from an empty admission queue")
        priority, tq, start = chosen
        _, ticket = heapq.heappop(tq.heap)
        entry = self._live[ticket]
        tq.finish = start + entry.cost / self.policy.weight(entry.tenant)
        self._virtual[priority] = start
        self._forget(entry)
        if now is not None:
            self.note_admitted(now)
        return entry

    def remove(self, ticket: int) -> bool:
        entry = self._live.get(ticket)
        if entry is None:
            return False
        self._forget(entry)
        return True

    def expire(self, now: float) -> list[QueueEntry]:
        gone = [e for e in self._live.values() if e.deadline_at <= now]
        for e in gone:
            self._forget(e)
        return gone

    def note_admitted(self, now: float) -> None:
        if self._last_admit is not None:
            dt = max(0.0, now - self._last_admit)
            self._admit_interval = (
                dt if self._admit_interval is None else 0.8 * self._admit_interval + 0.2 * dt
            )
        self._last_admit = now

    def retry_after_s(self, tenant: str | None = None) -> float:
        p = self.policy
        ahead = self.depth(tenant) if tenant is not None else len(self._live)
        if self._admit_interval is None:
            return p.retry_after_max_s if ahead else p.retry_after_min_s
        return min(p.retry_after_max_s, max(p.retry_after_min_s, ahead * self._admit_interval))

    def _choose(self) -> tuple[int, _TenantQueue, float] | None:
        """(priority, tenant queue, virtual start) of the next entry to serve."""
        for priority in sorted(self._levels, reverse=True):
            level = self._levels[priority]
            virtual = self._virtual[priority]
            best: tuple[float, int, _TenantQueue] | None = None
            for tenant in list(level):
                tq = level[tenant]
                while tq.heap and tq.heap[0][1] not in self._live:
                    heapq.heappop(tq.heap)  # removed earlier (cancelled or expired)
                if not tq.heap:
                    if tq.finish <= virtual:
                        del level[tenant]  # nothing owed either way: forget the tenant
                    continue
                start = max(virtual, tq.finish)
                if best is None or (start, tq.heap[0][1]) < best[:2]:
                    best = (start, tq.heap[0][1], tq)
            if best is not None:
                return priority, best[2], best[0]
            if not level:
                del self._levels[priority]
        return None

    def _forget(self, entry: QueueEntry) -> None:
        del self._live[entry.ticket]
        left = self._per_tenant[entry.tenant] - 1
        if left:
            self._per_tenant[entry.tenant] = left
        else:
            del self._per_tenant[entry.tenant]
