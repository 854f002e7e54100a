"""Which pods of one pool exist, and what changed for the scheduler (pure; no I/O, no clock).

Fed with the result of every list and every watch event of the pool's pods, it answers:
which workers are gone (drop them), which leaders just started terminating (drain them), which
leaders should exist (the expected set), and which leaders lead an incomplete group (a member
is missing or terminating: the group cannot serve, so no new placements there).

Pods are tracked by name *and* uid: a group recreated by LWS reuses the pod names. When a new
incarnation shows up while the old one was never seen deleted (a missed event), the old one is
only forgotten, not dropped: the worker id now belongs to the new pod, whose agent may already
have registered (the registry itself replaces a worker that says Hello again).
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from scheduler.kubernetes.pod_info import PodInfo


class MembershipChange(msgspec.Struct):
    # (worker id, reason): pods that are gone.
    dropped: list[tuple[str, str]] = msgspec.field(default_factory=list)
    # (worker id, deletion deadline in epoch seconds): leaders newly marked for deletion.
    terminating: list[tuple[str, float]] = msgspec.field(default_factory=list)
    # Leaders whose pod was replaced by a new incarnation (same name, new uid): forget the old one.
    replaced: list[str] = msgspec.field(default_factory=list)


class PoolMembership:
    def __init__(self) -> None:
        self._pods: dict[str, PodInfo] = {}

    def relist(self, pods: Iterable[PodInfo]) -> MembershipChange:
        """Replace everything with a fresh list: pods missing from it were deleted meanwhile."""
        change = MembershipChange()
        fresh = {pod.name: pod for pod in pods}
        for name, known in list(self._pods.items()):
            current = fresh.get(name)
            if current is None:
                self._remove(known, "pod deleted (found on re-list)", change)
            elif current.uid != known.uid:
                self._replace(known, change)
        for pod in fresh.values():
            self._upsert(pod, change)
        return change

    def apply(self, event: str, pod: PodInfo) -> MembershipChange:
        """One watch event: ``ADDED``, ``MODIFIED`` or ``DELETED``."""
        change = MembershipChange()
        if event == "DELETED":
            known = self._pods.get(pod.name)
            if known is not None and pod.uid and known.uid and known.uid != pod.uid:
                return change  # the deletion of an older incarnation we already replaced
            self._remove(known or pod, "pod deleted", change)
        elif event in ("ADDED", "MODIFIED"):
            self._upsert(pod, change)
        return change

    def expected(self) -> set[str]:
        """Leaders that exist and are not being deleted: the workers that should be registered."""
        return {pod.name for pod in self._pods.values() if pod.is_leader and not pod.terminating}

    def incomplete_group_leaders(self) -> set[str]:
        """Live leaders whose group misses a member or has one terminating."""
        members: dict[str, list[PodInfo]] = {}
        for pod in self._pods.values():
            if pod.group is not None and not pod.is_leader:
                members.setdefault(pod.group, []).append(pod)
        out: set[str] = set()
        for leader in self._pods.values():
            if not leader.is_leader or leader.terminating or leader.group is None:
                continue
            group = members.get(leader.group, [])
            alive = 1 + sum(1 for pod in group if not pod.terminating)
            if any(pod.terminating for pod in group) or (leader.group_size or 1) > alive:
                out.add(leader.name)
        return out

    def _upsert(self, pod: PodInfo, change: MembershipChange) -> None:
        known = self._pods.get(pod.name)
        if known is not None and known.uid != pod.uid:
            self._replace(known, change)
            known = None
        self._pods[pod.name] = pod
        if pod.is_leader and pod.deletion_deadline is not None and (known is None or not known.terminating):
            change.terminating.append((pod.name, pod.deletion_deadline))

    def _replace(self, pod: PodInfo, change: MembershipChange) -> None:
        self._pods.pop(pod.name, None)
        if pod.is_leader:
            change.replaced.append(pod.name)

    def _remove(self, pod: PodInfo, reason: str, change: MembershipChange) -> None:
        self._pods.pop(pod.name, None)
        if pod.is_leader:
            change.dropped.append((pod.name, reason))
