"""Who wants a worker drained, so that two holders never undo each other.

Discovery drains leaders whose pod is terminating or whose group is incomplete; the autoscaler
drains the groups it is about to remove. A worker drains while any reason holds, and is
released only when the last one goes.
"""

from __future__ import annotations

from scheduler.kubernetes.directory import WorkerDirectory

POD_TERMINATING = "pod-terminating"
GROUP_INCOMPLETE = "group-incomplete"
SCALE_DOWN = "scale-down"


class DrainReasons:
    def __init__(self, directory: WorkerDirectory) -> None:
        self._directory = directory
        self._held: dict[str, set[str]] = {}

    def hold(self, worker_id: str, reason: str) -> None:
        reasons = self._held.setdefault(worker_id, set())
        first = not reasons
        reasons.add(reason)
        if first:
            self._directory.set_draining(worker_id, True)

    def release(self, worker_id: str, reason: str) -> None:
        reasons = self._held.get(worker_id)
        if reasons is None or reason not in reasons:
            return
        reasons.discard(reason)
        if not reasons:
            del self._held[worker_id]
            self._directory.set_draining(worker_id, False)

    def clear(self, worker_id: str) -> None:
        """Drop every reason at once (the worker id now belongs to a new pod): undrain it."""
        if self._held.pop(worker_id, None):
            self._directory.set_draining(worker_id, False)

    def forget(self, worker_id: str) -> None:
        """The worker is gone for good: drop its reasons without telling the directory."""
        self._held.pop(worker_id, None)

    def held(self, reason: str | None = None) -> set[str]:
        return {w for w, reasons in self._held.items() if reason is None or reason in reasons}

    def reassert(self) -> None:
        """Tell the directory again: it ignores unknown ids, and a worker may have registered since."""
        for worker_id in self._held:
            self._directory.set_draining(worker_id, True)
