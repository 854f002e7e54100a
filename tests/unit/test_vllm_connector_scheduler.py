"""The connector's scheduler-side bookkeeping, fed the same shapes vLLM's scheduler passes it.

The request/scheduler-output records below carry only the attributes the connector reads; the
real vLLM objects are exercised by the end-to-end tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transport.messages import KvMode, KvRoute
from workers.engines.vllm.connector_scheduler import PdorchSchedulerSide
from workers.engines.vllm.transfer_params import RECV, SEND, kv_transfer_params

BS = 32


@dataclass
class Req:
    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: dict[str, Any] | None


@dataclass
class Blocks:
    ids: list[int]

    def get_block_ids(self) -> tuple[list[int], ...]:
        return (self.ids,)


@dataclass
class NewReq:
    req_id: str
    num_computed_tokens: int


@dataclass
class CachedReqs:
    req_ids: list[str] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)


@dataclass
class SchedOut:
    scheduled_new_reqs: list[NewReq] = field(default_factory=list)
    scheduled_cached_reqs: CachedReqs = field(default_factory=CachedReqs)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)


def _req(req_id: str, n: int, direction: str | None, tid: str = "t1") -> Req:
    params = kv_transfer_params(direction, KvRoute(KvMode.P2P, "tcp://d:1", tid), 30.0) if direction else None
    return Req(req_id, list(range(n)), params)


def _block_ids_of(table: dict[str, list[int]]):
    return lambda req_id: table[req_id]


def test_decode_loads_the_whole_prompt_asynchronously_once() -> None:
    side = PdorchSchedulerSide(BS, max_lease_s=60)
    req = _req("d1", 70, RECV)
    side.on_new_request(req)
    assert side.get_num_new_matched_tokens(req, 0) == (70, True)
    side.update_state_after_alloc(req, Blocks([4, 5, 9]), 70)
    plan = side.build_plan(SchedOut(), _block_ids_of({}))
    (recv,) = plan.recvs
    assert (recv.req_id, recv.block_ids, recv.skip_rows, recv.num_tokens) == ("d1", [4, 5, 9], 0, 70)
    assert recv.params.transfer_id == "t1"
    # Asked again (e.g. after preemption), the load is not planned twice.
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)
    assert side.build_plan(SchedOut(), _block_ids_of({})).recvs == []


def test_decode_with_a_local_prefix_hit_loads_only_the_rest() -> None:
    side = PdorchSchedulerSide(BS, max_lease_s=60)
    req = _req("d1", 100, RECV)
    side.on_new_request(req)
    assert side.get_num_new_matched_tokens(req, 64) == (36, True)
    side.update_state_after_alloc(req, Blocks([1, 2, 7, 8]), 36)
    (recv,) = side.build_plan(SchedOut(), _block_ids_of({})).recvs
    assert (recv.block_ids, recv.skip_rows) == ([7, 8], 2)


def test_requests_without_pdorch_params_are_left_alone() -> None:
    side = PdorchSchedulerSide(BS, max_lease_s=60)
    req = _req("x", 40, None)
    side.on_new_request(req)
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)
    side.update_state_after_alloc(req, Blocks([1, 2]), 0)
    out = SchedOut([NewReq("x", 0)], num_scheduled_tokens={"x": 40})
    plan = side.build_plan(out, _block_ids_of({"x": [1, 2]}))
    assert plan.sends == [] and plan.recvs == []
    assert side.request_finished(req) == (False, None)


def test_prefill_sends_with_the_last_chunk_and_leases_the_blocks() -> None:
    side = PdorchSchedulerSide(BS, max_lease_s=10)
    req = _req("p1", 80, SEND)
    side.on_new_request(req)
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)
    table = {"p1": [3, 4, 6, 11]}  # one block beyond the prompt (room for the output token)
    # First chunk: 48 of 80 prompt tokens. No send yet.
    plan = side.build_plan(SchedOut([NewReq("p1", 0)], num_scheduled_tokens={"p1": 48}), _block_ids_of(table))
    assert plan.sends == []
    # Second chunk completes the prompt: the send covers exactly the prompt's 3 blocks.
    cached = CachedReqs(["p1"], [48])
    plan = side.build_plan(
        SchedOut(scheduled_cached_reqs=cached, num_scheduled_tokens={"p1": 32}), _block_ids_of(table)
    )
    (send,) = plan.sends
    assert (send.block_ids, send.num_tokens, send.lease_s) == ([3, 4, 6], 80, 10)
    # Never planned twice.
    assert (
        side.build_plan(
            SchedOut(scheduled_cached_reqs=cached, num_scheduled_tokens={"p1": 1}), _block_ids_of(table)
        ).sends
        == []
    )
    delay, params = side.request_finished(req)
    assert delay is True
    assert params == {"pdorch": {"transfer_id": "t1", "sent": True}}


def test_prefill_finished_before_its_send_was_planned_frees_at_once() -> None:
    side = PdorchSchedulerSide(BS, max_lease_s=10)
    req = _req("p1", 80, SEND)
    side.on_new_request(req)
    side.build_plan(
        SchedOut([NewReq("p1", 0)], num_scheduled_tokens={"p1": 48}), _block_ids_of({"p1": [1, 2, 3]})
    )
    delay, _ = side.request_finished(req)  # aborted mid-prompt
    assert delay is False


def test_decode_aborted_while_loading_cancels_the_load() -> None:
    side = PdorchSchedulerSide(BS, max_lease_s=10)
    a, b = _req("a", 40, RECV, "ta"), _req("b", 40, RECV, "tb")
    for req in (a, b):
        side.on_new_request(req)
        side.get_num_new_matched_tokens(req, 0)
        side.update_state_after_alloc(req, Blocks([1, 2]), 40)
    side.build_plan(SchedOut(), _block_ids_of({}))
    side.update_connector_output({"b"})  # b's load finished, a's did not
    assert side.request_finished(a) == (False, None)
    assert side.request_finished(b) == (False, None)
    assert side.build_plan(SchedOut(), _block_ids_of({})).cancel_recvs == ["a"]


def test_a_decode_request_is_announced_on_arrival_and_withdrawn_if_it_ends_queued() -> None:
    """vLLM may queue a decode request longer than the KV endpoint keeps a stranger's begin: it is
    announced when it arrives; ended before its load started, it is withdrawn (its sender let go)."""
    side = PdorchSchedulerSide(BS, max_lease_s=60)
    queued, prefill = _req("d1", 70, RECV, tid="t1"), _req("p1", 70, SEND, tid="t2")
    side.on_new_request(queued)
    side.on_new_request(prefill)
    plan = side.build_plan(SchedOut(), _block_ids_of({}))
    assert [p.transfer_id for p in plan.announce] == ["t1"]  # only the decode side receives
    assert plan.withdraw == []
    assert side.build_plan(SchedOut(), _block_ids_of({})).announce == []  # announced once
    side.request_finished(queued)  # e.g. the client went away while vLLM still queued it
    plan = side.build_plan(SchedOut(), _block_ids_of({}))
    assert [p.transfer_id for p in plan.withdraw] == ["t1"] and plan.cancel_recvs == []


def test_a_decode_request_whose_load_started_is_cancelled_not_withdrawn() -> None:
    side = PdorchSchedulerSide(BS, max_lease_s=60)
    req = _req("d1", 70, RECV)
    side.on_new_request(req)
    side.get_num_new_matched_tokens(req, 0)
    side.update_state_after_alloc(req, Blocks([4, 5, 9]), 70)
    side.build_plan(SchedOut(), _block_ids_of({}))
    side.request_finished(req)
    plan = side.build_plan(SchedOut(), _block_ids_of({}))
    assert plan.cancel_recvs == ["d1"] and plan.withdraw == []


def test_a_decode_request_needing_no_load_is_withdrawn_at_admission() -> None:
    """Its prompt was all in the local prefix cache: no sender's KV will be taken."""
    side = PdorchSchedulerSide(BS, max_lease_s=60)
    req = _req("d1", 70, RECV)
    side.on_new_request(req)
    side.update_state_after_alloc(req, Blocks([4, 5, 9]), 0)
    plan = side.build_plan(SchedOut(), _block_ids_of({}))
    assert plan.recvs == [] and [p.transfer_id for p in plan.withdraw] == ["t1"]
    side.request_finished(req)
    assert side.build_plan(SchedOut(), _block_ids_of({})).withdraw == []  # not twice
