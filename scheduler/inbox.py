"""Per-request event queues: where worker messages about a request are delivered.

The control server puts ``TokenOutput``/``KvLoaded``/``JobError`` (and synthetic ``WorkerLost``
events) here by request id; the request's flow reads them with deadlines. Messages for requests
that are gone (finished or cancelled) are dropped: late tokens are normal after a cancel.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from transport.messages import JobError, KvLoaded, TokenOutput


@dataclass(frozen=True)
class WorkerLost:
    worker_id: str
    reason: str


Event = TokenOutput | KvLoaded | JobError | WorkerLost


class Inbox:
    def __init__(self) -> None:
        self._queues: dict[str, tuple[asyncio.Queue[tuple[str, Event]], set[str]]] = {}
        self.dropped = 0

    def open(self, request_id: str) -> asyncio.Queue[tuple[str, Event]]:
        queue: asyncio.Queue[tuple[str, Event]] = asyncio.Queue()
        self._queues[request_id] = (queue, set())
        return queue

    def close(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    def expect_from(self, request_id: str, worker_id: str) -> None:
        """Only messages from workers the request was sent to are accepted."""
        entry = self._queues.get(request_id)
        if entry is not None:
            entry[1].add(worker_id)

    def stop_expecting(self, request_id: str, worker_id: str) -> None:
        entry = self._queues.get(request_id)
        if entry is not None:
            entry[1].discard(worker_id)

    def deliver(self, worker_id: str, request_id: str, event: Event) -> bool:
        entry = self._queues.get(request_id)
        if entry is None or worker_id not in entry[1]:
            self.dropped += 1
            return False
        entry[0].put_nowait((worker_id, event))
        return True

    def workers_lost(self, worker_id: str, request_ids: list[str], reason: str) -> None:
        """A worker was dropped: tell every request that was on it."""
        for rid in request_ids:
            self.deliver(worker_id, rid, WorkerLost(worker_id, reason))

    def __len__(self) -> int:
        return len(self._queues)
