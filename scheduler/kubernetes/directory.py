"""The scheduler side that discovery and the autoscaler drive: its worker registry.

The scheduler's registry (``scheduler/cluster.py``) implements this protocol; this package only
calls it, always from the event loop thread.
"""

from __future__ import annotations

from typing import Protocol


class WorkerDirectory(Protocol):
    """What Kubernetes tells the scheduler about its workers. Worker id == leader pod name.

    Calls about a worker id the registry does not know (not registered yet, or already gone)
    must be harmless no-ops; discovery re-asserts draining marks periodically, so a worker that
    registers late still ends up draining.
    """

    def drop_worker(self, worker_id: str, reason: str) -> None:
        """The worker's pod is gone: forget it at once and fail the requests placed on it."""
        ...

    def set_expected(self, pool: str, worker_ids: set[str]) -> None:
        """The leaders that should exist in ``pool`` ("prefill" or "decode") right now."""
        ...

    def set_draining(self, worker_id: str, draining: bool) -> None:
        """Draining workers keep their running requests but get no new placements."""
        ...

    def inflight(self, worker_id: str) -> int:
        """Requests the scheduler still has running on the worker (0 for an unknown worker)."""
        ...
