"""The request's failure edges: what recovery decides for each failure in each phase (table-driven),
the inbox's routing of attempts' messages, and the broker's circuit breaker."""

from __future__ import annotations

import asyncio

import pytest

from scheduler.flow.attempt import Attempt, Failure, Phase
from scheduler.flow.broker_health import BrokerHealth
from scheduler.flow.recovery import Recovery, kv_path_failed, recovery
from scheduler.inbox import Inbox, KvBrokerLost, WorkerLost
from transport.errors import ErrorCode
from transport.messages import KvMode, TokenOutput

P2P, CENTRAL = KvMode.P2P, KvMode.CENTRALIZED


def _attempt(phase: Phase, mode: KvMode | None = P2P, colocated: bool = False) -> Attempt:
    a = Attempt(0, "job", "p", "p" if colocated else "d", 0, 0.0, kv_mode=None if colocated else mode)
    a.decode_tried = {a.decode}
    a.first_token_in = phase is not Phase.PREFILL
    a.kv_loaded = phase is Phase.DECODE
    assert a.phase is phase
    return a


LOST_D = Failure("d", ErrorCode.WORKER_LOST, "", "lost")
LOST_P = Failure("p", ErrorCode.WORKER_LOST, "", "lost")
STALLED_D = Failure("d", ErrorCode.DEADLINE_EXCEEDED, "", "stalled")
KV_ERROR_D = Failure("d", ErrorCode.KV_TRUNCATED, "", "error")
BLOCKS_D = Failure("d", ErrorCode.OUT_OF_BLOCKS, "", "error")
BAD_REQUEST = Failure("p", ErrorCode.INVALID_REQUEST, "", "error")
BROKER = Failure("", ErrorCode.KV_TRUNCATED, "", "lost")

CASES = [
    # The request's own fault fails anywhere.
    (BAD_REQUEST, Phase.PREFILL, P2P, Recovery.GIVE_UP),
    # The prefill worker lost, in any phase: resume from the tokens so far.
    (LOST_P, Phase.PREFILL, P2P, Recovery.RESUME),
    (LOST_P, Phase.HANDOFF, P2P, Recovery.RESUME),
    (LOST_P, Phase.HANDOFF, CENTRAL, Recovery.RESUME),
    # The decode side before the prefill's first token: wait for it (EOS at prefill ends it there).
    (LOST_D, Phase.PREFILL, P2P, Recovery.HOLD),
    (KV_ERROR_D, Phase.PREFILL, P2P, Recovery.HOLD),
    (KV_ERROR_D, Phase.PREFILL, CENTRAL, Recovery.HOLD),
    # ...after it, p2p: the KV is lost with the decode worker.
    (LOST_D, Phase.HANDOFF, P2P, Recovery.RESUME),
    (KV_ERROR_D, Phase.HANDOFF, P2P, Recovery.RESUME),
    # Centralized: the broker keeps the KV for another decode worker, unless the KV plane failed.
    (LOST_D, Phase.PREFILL, CENTRAL, Recovery.NEW_DECODE),
    (LOST_D, Phase.HANDOFF, CENTRAL, Recovery.NEW_DECODE),
    (BLOCKS_D, Phase.HANDOFF, CENTRAL, Recovery.NEW_DECODE),
    (KV_ERROR_D, Phase.HANDOFF, CENTRAL, Recovery.RESUME),
    (BROKER, Phase.HANDOFF, CENTRAL, Recovery.RESUME),
    # Once the decode side holds the KV, anything is resumed from the tokens so far.
    (LOST_D, Phase.DECODE, P2P, Recovery.RESUME),
    (LOST_D, Phase.DECODE, CENTRAL, Recovery.RESUME),
    (STALLED_D, Phase.DECODE, P2P, Recovery.RESUME),
]


@pytest.mark.parametrize(("failure", "phase", "mode", "want"), CASES)
def test_recovery_decisions(failure: Failure, phase: Phase, mode: KvMode, want: Recovery) -> None:
    assert recovery(failure, _attempt(phase, mode)) is want


def test_a_colocated_worker_lost_is_resumed() -> None:
    assert recovery(LOST_P, _attempt(Phase.DECODE, colocated=True)) is Recovery.RESUME


def test_a_transfer_is_moved_to_a_few_decode_workers_at_most() -> None:
    a = _attempt(Phase.HANDOFF, CENTRAL)
    a.decode_tried = {"d", "d2", "d3"}
    assert recovery(LOST_D, a) is Recovery.RESUME


def test_the_stalled_worker_of_each_phase() -> None:
    assert _attempt(Phase.PREFILL).progress_worker() == "p"
    assert _attempt(Phase.HANDOFF).progress_worker() == "d"
    assert _attempt(Phase.DECODE).progress_worker() == "d"


async def test_inbox_takes_only_the_current_attempts_messages_from_its_workers() -> None:
    inbox = Inbox()
    queue = inbox.open("r")
    inbox.expect("r", "r", "p")
    inbox.expect("r", "r", "d")
    assert inbox.deliver("p", "r", TokenOutput("r", [1]))
    assert not inbox.deliver("x", "r", TokenOutput("r", [2]))  # not sent there
    inbox.forget_job("r")  # the request moved on to attempt "r.1"
    inbox.expect("r", "r.1", "d")
    assert not inbox.deliver("d", "r", TokenOutput("r", [3]))  # late, from the abandoned attempt
    inbox.workers_lost("d", ["r.1"], "gone")
    inbox.notify("r.1", KvBrokerLost("restarted"))
    inbox.notify("r", KvBrokerLost("restarted"))  # abandoned: nobody to tell
    got = [queue.get_nowait() for _ in range(queue.qsize())]
    assert got == [
        ("p", "r", TokenOutput("r", [1])),
        ("d", "r.1", WorkerLost("d", "gone")),
        ("", "r.1", KvBrokerLost("restarted")),
    ]
    assert inbox.dropped == 2
    inbox.close("r")
    assert not inbox.deliver("d", "r.1", TokenOutput("r.1", [4])) and len(inbox) == 0
    await asyncio.sleep(0)


def test_broker_breaker_opens_doubles_and_ignores_failures_of_one_outage() -> None:
    now = [0.0]
    health = BrokerHealth(1.0, max_backoff_s=4.0, clock=lambda: now[0])
    assert health.usable()
    health.failed("boom", began_at=0.0)
    assert not health.usable()
    health.failed("same outage", began_at=-0.5)  # began before it opened: not counted again
    now[0] = 1.0
    assert health.usable() and health.window.failures == 1
    health.failed("again", began_at=1.0)  # a new handoff failed too: twice as long
    now[0] = 2.9
    assert not health.usable()
    now[0] = 3.0
    assert health.usable()
    health.succeeded()
    health.failed("later", began_at=3.0)
    now[0] = 4.0
    assert health.usable()  # back to one second after a success
    health.reachable = lambda: False  # the monitor says the broker is gone
    assert not health.usable()


HANDOFF_STALLED = Failure("d", ErrorCode.KV_TIMEOUT, "", "stalled")
SENDER_TIMED_OUT = Failure("p", ErrorCode.KV_TIMEOUT, "", "error")
SENDER_CUT_SHORT = Failure("p", ErrorCode.KV_TRUNCATED, "", "error")
RECEIVER_GAVE_UP = Failure("d", ErrorCode.KV_TRUNCATED, "", "error")
KV_PATH_CASES = [
    # The handoff did not land, and nothing says the sender is at fault.
    (HANDOFF_STALLED, Phase.HANDOFF, P2P, True),
    (SENDER_TIMED_OUT, Phase.HANDOFF, P2P, True),
    (SENDER_CUT_SHORT, Phase.PREFILL, P2P, True),
    # The receiver waited for its sender: the sender's side.
    (RECEIVER_GAVE_UP, Phase.HANDOFF, P2P, False),
    # A worker lost is dropped as lost; other failures are not the KV path's.
    (LOST_D, Phase.HANDOFF, P2P, False),
    (STALLED_D, Phase.PREFILL, P2P, False),
    (BLOCKS_D, Phase.HANDOFF, P2P, False),
    # The KV landed; through the broker its own breaker decides; no handoff at all.
    (HANDOFF_STALLED, Phase.DECODE, P2P, False),
    (HANDOFF_STALLED, Phase.HANDOFF, CENTRAL, False),
]


@pytest.mark.parametrize(("failure", "phase", "mode", "down"), KV_PATH_CASES)
def test_which_failures_say_the_kv_path_to_the_decode_worker_is_down(
    failure: Failure, phase: Phase, mode: KvMode, down: bool
) -> None:
    assert kv_path_failed(failure, _attempt(phase, mode)) is down


def test_a_colocated_attempt_has_no_kv_path() -> None:
    assert not kv_path_failed(HANDOFF_STALLED, _attempt(Phase.PREFILL, colocated=True))
