"""The pure admission core: ordering (priority, fair share, deadlines), bounds, retry hints."""

from __future__ import annotations

import math

import pytest

from scheduler.admission.policy import AdmissionPolicy, QueueOrder
from scheduler.admission.queue import FairQueue, QueueFull
from transport.errors import ErrorCode, PdorchError


def drain(q: FairQueue) -> list[str]:
    out = []
    while len(q):
        e = q.pop()
        out.append(f"{e.tenant}{e.ticket}")
    return out


ORDER_CASES = [
    (
        "FIFO within one tenant",
        AdmissionPolicy(),
        [("a", 0, math.inf), ("a", 0, math.inf), ("a", 0, math.inf)],
        ["a1", "a2", "a3"],
    ),
    (
        "a burst from one tenant interleaves with another",
        AdmissionPolicy(),
        [("a", 0, math.inf)] * 4 + [("b", 0, math.inf)] * 2,
        ["a1", "b5", "a2", "b6", "a3", "a4"],
    ),
    (
        "higher priority always first",
        AdmissionPolicy(),
        [("a", 0, math.inf), ("b", 5, math.inf), ("a", 1, math.inf)],
        ["b2", "a3", "a1"],
    ),
    (
        "weights: a gets twice b's share",
        AdmissionPolicy(tenant_weights={"a": 2.0}),
        [("a", 0, math.inf)] * 6 + [("b", 0, math.inf)] * 3,
        ["a1", "b7", "a2", "a3", "b8", "a4", "a5", "b9", "a6"],
    ),
    (
        "earliest deadline first within a tenant",
        AdmissionPolicy(order=QueueOrder.DEADLINE),
        [("a", 0, 30.0), ("a", 0, 10.0), ("a", 0, 20.0)],
        ["a2", "a3", "a1"],
    ),
    (
        "deadline order does not break fairness across tenants",
        AdmissionPolicy(order=QueueOrder.DEADLINE),
        [("a", 0, 5.0), ("a", 0, 1.0), ("b", 0, 100.0)],
        ["a2", "b3", "a1"],
    ),
]


@pytest.mark.parametrize(
    ("label", "policy", "pushes", "expected"), ORDER_CASES, ids=[c[0] for c in ORDER_CASES]
)
def test_order(label: str, policy: AdmissionPolicy, pushes: list, expected: list[str]) -> None:
    q = FairQueue(policy)
    for tenant, prio, deadline in pushes:
        q.push(tenant, prio, now=0.0, deadline_at=deadline)
    assert drain(q) == expected


def test_an_idle_tenant_banks_no_credit() -> None:
    q = FairQueue()
    for _ in range(3):
        q.push("a", 0, 0.0)
    assert [q.pop().tenant for _ in range(3)] == ["a", "a", "a"]
    # b was idle while a was served: it goes next (a just had its turn), then they alternate; b does
    # not "catch up" on a's three with a run of its own.
    for _ in range(3):
        q.push("a", 0, 1.0)
        q.push("b", 0, 1.0)
    assert [q.pop().tenant for _ in range(6)] == ["b", "a", "b", "a", "b", "a"]


@pytest.mark.parametrize(
    ("policy", "pushes", "rejected_tenant"),
    [
        (AdmissionPolicy(max_queued=2), ["a", "b", "c"], "c"),
        (AdmissionPolicy(max_queued=10, max_queued_per_tenant=2), ["a", "a", "b", "a"], "a"),
    ],
)
def test_bounds_reject_with_queue_full(
    policy: AdmissionPolicy, pushes: list[str], rejected_tenant: str
) -> None:
    q = FairQueue(policy)
    for tenant in pushes[:-1]:
        q.push(tenant, 0, 0.0)
    with pytest.raises(QueueFull) as info:
        q.push(pushes[-1], 0, 0.0)
    assert info.value.code is ErrorCode.QUEUE_FULL
    assert isinstance(info.value, PdorchError)
    assert policy.retry_after_min_s <= info.value.retry_after_s <= policy.retry_after_max_s
    assert len(q) == len(pushes) - 1


def test_retry_after_follows_the_admission_rate() -> None:
    q = FairQueue(AdmissionPolicy(max_queued=10, retry_after_min_s=0.5, retry_after_max_s=100.0))
    for _ in range(10):
        q.push("a", 0, 0.0)
    for t in range(1, 5):  # one admission every 2 s
        q.pop(now=2.0 * t)
        q.push("a", 0, 2.0 * t)
    assert q.retry_after_s() == pytest.approx(10 * 2.0)
    with pytest.raises(QueueFull) as info:
        q.push("a", 0, 9.0)
    assert info.value.retry_after_s == pytest.approx(20.0)


def test_remove_and_expire() -> None:
    q = FairQueue()
    e1 = q.push("a", 0, 0.0, deadline_at=5.0)
    e2 = q.push("a", 0, 0.0, deadline_at=50.0)
    e3 = q.push("b", 0, 0.0)
    assert q.remove(e2.ticket) and not q.remove(e2.ticket)
    assert [e.ticket for e in q.expire(now=10.0)] == [e1.ticket]
    assert q.peek() == e3 and len(q) == 1 and q.depth("a") == 0
    q.pop()
    assert q.peek() is None
    with pytest.raises(PdorchError):
        q.pop()


@pytest.mark.parametrize(
    "policy",
    [
        AdmissionPolicy(max_queued=-1),
        AdmissionPolicy(tenant_weights={"a": 0.0}),
        AdmissionPolicy(default_weight=float("inf")),
        AdmissionPolicy(retry_after_min_s=5.0, retry_after_max_s=1.0),
    ],
)
def test_bad_policy(policy: AdmissionPolicy) -> None:
    with pytest.raises(PdorchError) as info:
        FairQueue(policy)
    assert info.value.code is ErrorCode.CONFIG
