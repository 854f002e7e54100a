"""Per-request event queues: where worker messages about a request's jobs are delivered.

Workers address every message by *job id* (the scheduler's id of one attempt at a request: a
request moved to other workers after a failure gets a new one). The control server hands
``TokenOutput``/``KvLoaded``/``JobError`` (and synthetic ``WorkerLost`` events) to :meth:`deliver`;
they reach the request's queue only from a worker the job was sent to, while the job is current.
Everything else is dropped and counted: late tokens after a cancel, and messages of an attempt that
was abandoned when its request moved on.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from transport.messages import JobError, KvArriving, KvLoaded, TokenOutput


@dataclass(frozen=True)
class WorkerLost:
    worker_id: str
    reason: str


@dataclass(frozen=True)
class KvBrokerLost:
    """The KV broker died or restarted while the job's handoff went through it."""

    reason: str


@dataclass(frozen=True)
class KvPathDown:
    """Another handoff over the KV path the job's handoff takes did not land, and the path now backs
    off: ``(prefill, decode)`` for the pair, ``(worker,)`` for a worker's whole KV network."""

    path: tuple[str, ...]
    reason: str  # why that handoff failed


@dataclass(frozen=True)
class Wake:
    """The request's own timer went off (put there by its orchestrator, not a worker): look at
    the clock."""


Event = TokenOutput | KvLoaded | KvArriving | JobError | WorkerLost | KvBrokerLost | KvPathDown | Wake
# What a request's queue holds: (worker id, job id, event); worker id "" for KvBrokerLost and
# KvPathDown, both "" for Wake.
Delivery = tuple[str, str, Event]


@dataclass
class _Job:
    request_id: str
    workers: set[str]


class Inbox:
    def __init__(self) -> None:
        self._queues: dict[str, asyncio.Queue[Delivery]] = {}
        self._jobs: dict[str, _Job] = {}
        self._jobs_of: dict[str, set[str]] = {}
        # Messages for requests or jobs that are no longer current (late, cancelled, migrated).
        self.dropped = 0

    def open(self, request_id: str) -> asyncio.Queue[Delivery]:
        queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._queues[request_id] = queue
        self._jobs_of[request_id] = set()
        return queue

    def close(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        for job_id in self._jobs_of.pop(request_id, ()):
            self._jobs.pop(job_id, None)

    def expect(self, request_id: str, job_id: str, worker_id: str) -> None:
        """Messages about ``job_id`` from ``worker_id`` now go to the request's queue."""
        jobs = self._jobs_of.get(request_id)
        if jobs is None:
            return
        jobs.add(job_id)
        self._jobs.setdefault(job_id, _Job(request_id, set())).workers.add(worker_id)

    def stop_expecting(self, job_id: str, worker_id: str) -> None:
        job = self._jobs.get(job_id)
        if job is not None:
            job.workers.discard(worker_id)

    def forget_job(self, job_id: str) -> None:
        """The attempt is abandoned: whatever its workers still send is dropped."""
        job = self._jobs.pop(job_id, None)
        if job is not None:
            self._jobs_of.get(job.request_id, set()).discard(job_id)

    def deliver(self, worker_id: str, job_id: str, event: Event) -> bool:
        job = self._jobs.get(job_id)
        queue = self._queues.get(job.request_id) if job is not None else None
        if job is None or queue is None or worker_id not in job.workers:
            self.dropped += 1
            return False
        queue.put_nowait((worker_id, job_id, event))
        return True

    def notify(self, job_id: str, event: KvBrokerLost | KvPathDown) -> None:
        """An event about the job that no worker sent."""
        job = self._jobs.get(job_id)
        queue = self._queues.get(job.request_id) if job is not None else None
        if queue is not None:
            queue.put_nowait(("", job_id, event))

    def workers_lost(self, worker_id: str, job_ids: list[str], reason: str) -> None:
        """A worker was dropped: tell the request of every job that was on it."""
        for job_id in job_ids:
            self.deliver(worker_id, job_id, WorkerLost(worker_id, reason))

    def __len__(self) -> int:
        return len(self._queues)
