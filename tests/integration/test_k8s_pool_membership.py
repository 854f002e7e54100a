"""Pool membership from pod objects (pure: no API, no threads)."""

from __future__ import annotations

from typing import Any

import pytest

from scheduler.kubernetes.pod_info import PodInfo, parse_pod
from scheduler.kubernetes.pool_membership import PoolMembership


def pod(
    name: str, uid: str = "", *, group: int | None = 0, worker: int = 0, size: int = 1, deleting: str = ""
) -> Any:
    labels = {"pdorch.io/pool": "decode"}
    if group is not None:
        labels |= {
            "leaderworkerset.sigs.k8s.io/name": "pdorch-decode",
            "leaderworkerset.sigs.k8s.io/group-index": str(group),
            "leaderworkerset.sigs.k8s.io/worker-index": str(worker),
        }
    meta: dict[str, Any] = {
        "name": name,
        "uid": uid or f"uid-{name}",
        "labels": labels,
        "annotations": {"leaderworkerset.sigs.k8s.io/size": str(size)},
    }
    if deleting:
        meta["deletionTimestamp"] = deleting
    return parse_pod({"metadata": meta})


def test_parse_pod_reads_lws_labels_and_deletion() -> None:
    info = pod("pdorch-decode-1-2", group=1, worker=2, size=3, deleting="2030-01-02T03:04:05Z")
    assert info.group == "pdorch-decode/1" and info.worker_index == 2 and info.group_size == 3
    assert not info.is_leader and info.terminating
    assert info.deletion_deadline == pytest.approx(1893553445.0)
    plain = parse_pod({"metadata": {"name": "standalone"}})
    assert plain.is_leader and plain.group is None and not plain.terminating
    with pytest.raises(ValueError):
        parse_pod({"metadata": {}})


def test_events_drive_expected_drops_and_terminating() -> None:
    m = PoolMembership()
    assert m.apply("ADDED", pod("d-0")).dropped == []
    m.apply("ADDED", pod("d-1", group=1))
    assert m.expected() == {"d-0", "d-1"}

    change = m.apply("MODIFIED", pod("d-1", group=1, deleting="2030-01-01T00:00:00+00:00"))
    assert change.terminating == [("d-1", pytest.approx(1893456000.0))]
    assert m.expected() == {"d-0"}
    # Reported once, not on every later update of the terminating pod.
    assert m.apply("MODIFIED", pod("d-1", group=1, deleting="2030-01-01T00:00:00+00:00")).terminating == []

    assert m.apply("DELETED", pod("d-1", group=1)).dropped == [("d-1", "pod deleted")]
    assert m.expected() == {"d-0"}


def test_a_recreated_pod_replaces_the_old_incarnation() -> None:
    m = PoolMembership()
    m.apply("ADDED", pod("d-0", "old"))
    # The DELETED of the old pod was missed; LWS recreated the group with the same name. The id
    # now belongs to the new pod (whose agent may have registered): forget the old, drop nothing.
    change = m.apply("ADDED", pod("d-0", "new"))
    assert change.dropped == [] and change.replaced == ["d-0"]
    # A late DELETED for the old incarnation must not drop the new one.
    assert m.apply("DELETED", pod("d-0", "old")).dropped == []
    assert m.expected() == {"d-0"}


def test_relist_finds_what_the_watch_missed() -> None:
    m = PoolMembership()
    m.relist([pod("d-0", "a"), pod("d-1", "b", group=1), pod("d-2", "c", group=2)])
    change = m.relist([pod("d-0", "a"), pod("d-2", "c2", group=2), pod("d-3", "d", group=3)])
    assert change.dropped == [("d-1", "pod deleted (found on re-list)")]
    assert change.replaced == ["d-2"]
    assert m.expected() == {"d-0", "d-2", "d-3"}


def test_worker_pods_are_not_workers_but_complete_groups() -> None:
    m = PoolMembership()
    m.apply("ADDED", pod("d-0", size=3))
    assert m.incomplete_group_leaders() == {"d-0"}  # its two worker pods do not exist yet
    m.apply("ADDED", pod("d-0-1", worker=1, size=3))
    m.apply("ADDED", pod("d-0-2", worker=2, size=3))
    assert m.incomplete_group_leaders() == set()
    assert m.expected() == {"d-0"}

    change = m.apply("MODIFIED", pod("d-0-2", worker=2, size=3, deleting="2030-01-01T00:00:00Z"))
    assert change.terminating == [] and change.dropped == []
    assert m.incomplete_group_leaders() == {"d-0"}
    assert m.apply("DELETED", pod("d-0-2", worker=2, size=3)).dropped == []
    assert m.incomplete_group_leaders() == {"d-0"}
    m.apply("ADDED", pod("d-0-2", "new", worker=2, size=3))
    assert m.incomplete_group_leaders() == set()


def test_a_terminating_leader_is_not_reported_incomplete() -> None:
    m = PoolMembership()
    m.apply("ADDED", pod("d-0", size=2, deleting="2030-01-01T00:00:00Z"))
    assert m.incomplete_group_leaders() == set()
    assert m.expected() == set()


def test_unreadable_deletion_timestamp_means_terminating_now() -> None:
    info: PodInfo = pod("d-0", deleting="yesterday")
    assert info.terminating and info.deletion_deadline == 0.0
