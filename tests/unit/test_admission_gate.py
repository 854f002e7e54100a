"""The asyncio admission gate: wait for room, deadlines, release, notify, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from scheduler.admission.gate import AdmissionGate
from scheduler.admission.policy import AdmissionPolicy
from scheduler.admission.queue import QueueFull
from transport.errors import ErrorCode, PdorchError

WAIT = 5.0  # every wait in these tests has this deadline


class Room:
    """A capacity the test opens and closes by hand."""

    def __init__(self, free: int) -> None:
        self.free = free

    def __call__(self) -> bool:
        return self.free > 0


async def test_admits_at_once_when_there_is_room() -> None:
    gate = AdmissionGate(has_room=Room(1))
    ticket = await asyncio.wait_for(gate.acquire("a"), WAIT)
    assert gate.inflight == 1 and gate.queued == 0
    ticket.release()
    ticket.release()  # idempotent
    assert gate.inflight == 0


async def test_waits_until_notified_of_room() -> None:
    room = Room(0)
    gate = AdmissionGate(has_room=room)
    waiter = asyncio.create_task(gate.acquire("a", deadline_s=WAIT))
    await asyncio.sleep(0)
    assert not waiter.done() and gate.queued == 1
    gate.notify()  # still no room: nothing happens
    await asyncio.sleep(0)
    assert not waiter.done()
    room.free = 1
    gate.notify()
    ticket = await asyncio.wait_for(waiter, WAIT)
    assert gate.queued == 0 and gate.inflight == 1
    ticket.release()


async def test_release_admits_the_next_in_fair_order() -> None:
    gate = AdmissionGate(AdmissionPolicy(max_inflight=1))
    first = await gate.acquire("a")
    order: list[str] = []

    async def want(tenant: str) -> None:
        t = await gate.acquire(tenant, deadline_s=WAIT)
        order.append(tenant)
        t.release()

    tasks = [asyncio.create_task(want(x)) for x in ("a", "a", "b")]
    await asyncio.sleep(0)
    assert gate.queued == 3
    first.release()
    await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    # "a" was just served (the first ticket), so "b" goes before a's second request.
    assert order == ["a", "b", "a"]


async def test_deadline_exceeded_leaves_the_queue() -> None:
    gate = AdmissionGate(has_room=Room(0))
    with pytest.raises(PdorchError) as info:
        await asyncio.wait_for(gate.acquire("a", deadline_s=0.05), WAIT)
    assert info.value.code is ErrorCode.DEADLINE_EXCEEDED
    assert gate.queued == 0 and gate.inflight == 0


async def test_queue_full_carries_retry_after() -> None:
    gate = AdmissionGate(AdmissionPolicy(max_queued=1), has_room=Room(0))
    waiter = asyncio.create_task(gate.acquire("a", deadline_s=WAIT))
    await asyncio.sleep(0)
    with pytest.raises(QueueFull) as info:
        await gate.acquire("b", deadline_s=WAIT)
    assert info.value.code is ErrorCode.QUEUE_FULL and info.value.retry_after_s > 0
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.queued == 0


async def test_cancelled_waiter_does_not_leak_capacity() -> None:
    room = Room(0)
    gate = AdmissionGate(AdmissionPolicy(max_inflight=1), has_room=room)
    waiter = asyncio.create_task(gate.acquire("a", deadline_s=WAIT))
    await asyncio.sleep(0)
    room.free = 1
    gate.notify()  # grants the ticket ...
    waiter.cancel()  # ... but the caller gives up before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.inflight == 0 and gate.queued == 0
    ticket = await asyncio.wait_for(gate.acquire("b"), WAIT)
    ticket.release()


async def test_per_call_room_check_blocks_the_head() -> None:
    gate = AdmissionGate()
    big_room = Room(0)
    big = asyncio.create_task(gate.acquire("a", deadline_s=WAIT, has_room=big_room))
    await asyncio.sleep(0)
    small = asyncio.create_task(gate.acquire("b", deadline_s=WAIT))
    await asyncio.sleep(0)
    # The head (big) does not fit, so the small one behind it waits too: no overtaking.
    assert not big.done() and not small.done()
    big_room.free = 1
    gate.notify()
    tickets = await asyncio.wait_for(asyncio.gather(big, small), WAIT)
    for t in tickets:
        t.release()
    assert gate.inflight == 0


async def test_ticket_as_context_manager() -> None:
    gate = AdmissionGate()
    async with await gate.acquire("a") as ticket:
        assert gate.inflight == 1
    assert ticket.released and gate.inflight == 0


async def test_the_room_check_is_the_decision_and_its_result_goes_with_the_ticket() -> None:
    """Admission's check places the request: what it returns is the admitted request's placement."""
    decisions = iter([None, "placed on p0+d1"])
    gate = AdmissionGate()
    waiter = asyncio.create_task(gate.acquire("a", deadline_s=WAIT, has_room=lambda: next(decisions)))
    await asyncio.sleep(0)
    assert not waiter.done()  # the first decision found no room
    gate.notify()
    ticket = await asyncio.wait_for(waiter, WAIT)
    assert ticket.grant == "placed on p0+d1"
    ticket.release()


async def test_a_check_that_sheds_fails_that_request_and_the_queue_goes_on() -> None:
    room = Room(0)
    shed = PdorchError(ErrorCode.QUEUE_FULL, "cannot meet its TTFT objective")
    state = {"shed": False}

    def doomed() -> bool:
        if state["shed"]:
            raise shed
        return False

    gate = AdmissionGate(has_room=room)
    first = asyncio.create_task(gate.acquire("a", deadline_s=WAIT, has_room=doomed))
    second = asyncio.create_task(gate.acquire("b", deadline_s=WAIT))
    await asyncio.sleep(0)
    assert gate.queued == 2
    state["shed"], room.free = True, 1
    gate.notify()
    with pytest.raises(PdorchError) as info:
        await asyncio.wait_for(first, WAIT)
    assert info.value is shed
    ticket = await asyncio.wait_for(second, WAIT)
    assert gate.queued == 0 and gate.inflight == 1
    ticket.release()
    # Refused at once, without queueing, when nobody waits.
    with pytest.raises(PdorchError):
        await gate.acquire("c", has_room=doomed)
    assert gate.queued == 0 and gate.inflight == 0


async def test_a_request_costs_its_sequences_against_max_inflight() -> None:
    gate = AdmissionGate(AdmissionPolicy(max_inflight=4))
    three = await gate.acquire("a", cost=3)
    assert gate.inflight == 3
    two = asyncio.create_task(gate.acquire("b", deadline_s=WAIT, cost=2))
    await asyncio.sleep(0)
    assert not two.done() and gate.queued == 1  # 3 + 2 > 4: it waits
    three.release()
    ticket = await asyncio.wait_for(two, WAIT)
    assert gate.inflight == 2
    ticket.release()
    assert gate.inflight == 0


async def test_a_request_dearer_than_the_limit_runs_alone() -> None:
    gate = AdmissionGate(AdmissionPolicy(max_inflight=2))
    small = await gate.acquire("a")
    big = asyncio.create_task(gate.acquire("b", deadline_s=WAIT, cost=5))
    await asyncio.sleep(0)
    assert not big.done()
    small.release()
    ticket = await asyncio.wait_for(big, WAIT)  # nothing else in flight: admitted
    assert gate.inflight == 5
    later = asyncio.create_task(gate.acquire("c", deadline_s=WAIT))
    await asyncio.sleep(0)
    assert not later.done()
    ticket.release()
    (await asyncio.wait_for(later, WAIT)).release()
    assert gate.inflight == 0


async def test_a_tenants_share_counts_its_sequences() -> None:
    """A tenant asking for 4 choices a request has used four requests' worth of its share."""
    gate = AdmissionGate(AdmissionPolicy(max_inflight=4))
    holder = await gate.acquire("x", cost=4)
    order: list[str] = []

    async def want(tenant: str, cost: int) -> None:
        t = await gate.acquire(tenant, deadline_s=WAIT, cost=cost)
        order.append(tenant)
        t.release()

    tasks = [asyncio.create_task(want("a", 4)) for _ in range(2)]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(want("b", 1)) for _ in range(4)]
    await asyncio.sleep(0)
    holder.release()
    await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    assert order == ["a", "b", "b", "b", "b", "a"]
