"""What discovery needs to know about one pod, read from the raw API object (pure)."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

import msgspec

# Labels and annotations the LeaderWorkerSet controller puts on every pod of a group.
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
LWS_GROUP_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/group-index"
LWS_WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
LWS_SIZE_ANNOTATION = "leaderworkerset.sigs.k8s.io/size"


class PodInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    uid: str = ""
    resource_version: str = ""
    # "<lws>/<group index>" for LWS pods; None for a pod outside any group (it is its own leader).
    group: str | None = None
    worker_index: int | None = None
    group_size: int | None = None
    # When the pod will be killed (epoch seconds): set once it is marked for deletion.
    deletion_deadline: float | None = None

    @property
    def is_leader(self) -> bool:
        # Only the leader runs an agent (worker id == its pod name); LWS gives it worker index 0.
        return self.worker_index in (None, 0)

    @property
    def terminating(self) -> bool:
        return self.deletion_deadline is not None


def parse_pod(raw: Mapping[str, Any]) -> PodInfo:
    """Read a pod object as the API returns it (JSON). Raises ValueError if it has no name."""
    meta = raw.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("pod object without metadata.name")
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    lws = labels.get(LWS_NAME_LABEL)
    group_index = labels.get(LWS_GROUP_INDEX_LABEL)
    return PodInfo(
        name=name,
        uid=str(meta.get("uid") or ""),
        resource_version=str(meta.get("resourceVersion") or ""),
        group=f"{lws}/{group_index}" if lws and group_index is not None else None,
        worker_index=_int_or_none(labels.get(LWS_WORKER_INDEX_LABEL)),
        group_size=_int_or_none(annotations.get(LWS_SIZE_ANNOTATION)),
        deletion_deadline=_epoch_or_none(meta.get("deletionTimestamp")),
    )


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _epoch_or_none(value: Any) -> float | None:
    if not value:
        return None
    try:
        stamp = datetime.datetime.fromisoformat(str(value))
    except ValueError:
        # Unreadable but present: the pod *is* being deleted; treat its grace period as over.
        return 0.0
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.UTC)
    return stamp.timestamp()
