"""The connector's data path without vLLM: a producer and a consumer worker side, each with its KV
plane thread, moving whole blocks between two paged caches over real ZeroMQ sockets on loopback.

This is what runs inside vLLM's worker processes; here the "forward pass" is the test calling
``save_kv_layer`` from its own thread, as vLLM does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pdorch.launcher import free_ports
from transport import sockets
from transport.kv.same_host import SameHostMode
from transport.messages import KvArriving
from transport.security import Security, SecurityConfig
from transport.security.key_set import KeySet
from transport.security.keys import read_keypair
from workers.engines.vllm.connector_metadata import RecvSpec, SendSpec, StepPlan
from workers.engines.vllm.connector_worker import PdorchWorkerSide
from workers.engines.vllm.kv_arrivals import ArrivalListener
from workers.engines.vllm.transfer_params import RECV, SEND, PdorchKvParams

pytestmark = pytest.mark.timeout(60)

LAYERS, BLOCKS, ROW = 3, 64, (2, 32, 16)


def _caches(seed: int | None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        f"model.layers.{i}.attn": (
            rng.standard_normal((BLOCKS, *ROW)).astype(np.float32)
            if seed is not None
            else np.zeros((BLOCKS, *ROW), np.float32)
        )
        for i in range(LAYERS)
    }


# The connectors authenticate as a prefill and a decode worker would (their agents' keys): the
# producer pins the consumer's key, which admits transfers in the producer's scope only.
_DECODE_KEY: dict[str, str] = {}


@pytest.fixture(params=[SameHostMode.OFF, SameHostMode.ON])
def sides(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[PdorchWorkerSide, PdorchWorkerSide, dict, dict]]:
    """Over TCP, and through shared memory (vLLM's CPU KV cache is plain memory), both on
    authenticated sockets."""
    keys = KeySet.create(tmp_path, {"prefill": (), "decode": ()})
    _DECODE_KEY["public"] = read_keypair(keys.key_file("decode")).public

    def security(name: str) -> SecurityConfig:
        return SecurityConfig(key_file=str(keys.key_file(name)), trusted_keys=str(keys.trusted_dir))

    # vLLM hands the worker side torch tensors; numpy arrays are taken as they are.
    src, dst = _caches(1), _caches(None)
    producer = PdorchWorkerSide(bind=None, security=security("prefill"), same_host=request.param)
    consumer = PdorchWorkerSide(
        bind="tcp://127.0.0.1:0", security=security("decode"), same_host=request.param
    )
    producer.register_kv_caches(src)
    consumer.register_kv_caches(dst)
    try:
        yield producer, consumer, src, dst
    finally:
        producer.shutdown()
        consumer.shutdown()


def _params(direction: str, endpoint: str, tid: str, deadline_s: float = 10.0) -> PdorchKvParams:
    return PdorchKvParams(direction, f"prefill/{tid}", "p2p", endpoint, deadline_s, _DECODE_KEY["public"])


def _wait(side: PdorchWorkerSide, finished: set[str], timeout_s: float = 20.0) -> tuple[set, set, set]:
    sent: set[str] = set()
    recvd: set[str] = set()
    failed: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s, r, f = side.get_transfer_results(finished)
        sent |= s
        recvd |= r
        failed |= f
        if sent or recvd:
            return sent, recvd, failed
        time.sleep(0.01)
    return sent, recvd, failed


def _forward(producer: PdorchWorkerSide, plan: StepPlan, layers: int = LAYERS) -> None:
    for i in range(layers):
        producer.save_kv_layer(plan, f"model.layers.{i}.attn")
    producer.wait_for_save(plan)


def test_blocks_arrive_in_the_planned_blocks(sides) -> None:  # type: ignore[no-untyped-def]
    producer, consumer, src, dst = sides
    endpoint = consumer.kv.endpoint
    src_ids, dst_ids = [5, 6, 7, 20], [40, 3, 9]  # the consumer holds the first block locally
    consumer.start_load_kv(
        StepPlan(recvs=[RecvSpec("d", _params(RECV, endpoint, "t1"), dst_ids, skip_rows=1, num_tokens=120)])
    )
    send = SendSpec("p", _params(SEND, endpoint, "t1"), src_ids, num_tokens=120, lease_s=10)
    _forward(producer, StepPlan(sends=[send]))
    _, recvd, failed = _wait(consumer, set())
    assert recvd == {"d"} and failed == set()
    for name in src:
        np.testing.assert_array_equal(dst[name][dst_ids], src[name][src_ids[1:]])
    # Not reported as sent until vLLM says the request finished; then exactly once.
    sent, _, _ = _wait(producer, set(), timeout_s=0.5)
    assert sent == set()
    sent, _, _ = _wait(producer, {"p"})
    assert sent == {"p"}
    assert producer.get_transfer_results({"p"})[0] == set()


def test_a_send_missing_layers_is_aborted_and_the_load_fails(sides) -> None:  # type: ignore[no-untyped-def]
    producer, consumer, _, _ = sides
    endpoint = consumer.kv.endpoint
    consumer.start_load_kv(StepPlan(recvs=[RecvSpec("d", _params(RECV, endpoint, "t2"), [1, 2], 0, 50)]))
    plan = StepPlan(sends=[SendSpec("p", _params(SEND, endpoint, "t2"), [5, 6], 50, 10)])
    _forward(producer, plan, layers=LAYERS - 1)
    _, recvd, failed = _wait(consumer, set())
    assert recvd == {"d"} and failed == {"d"}
    assert _wait(producer, {"p"})[0] == {"p"}, "the lease ends with the failed send"


def test_a_send_nobody_takes_ends_with_its_lease(sides) -> None:  # type: ignore[no-untyped-def]
    producer, _, _, _ = sides
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    plan = StepPlan(sends=[SendSpec("p", _params(SEND, dead, "t3"), [1], 10, lease_s=1.0)])
    _forward(producer, plan)
    assert _wait(producer, {"p"}, timeout_s=30)[0] == {"p"}
    assert "p" in producer.kv.errors


def test_a_load_whose_request_was_aborted_is_cancelled(sides) -> None:  # type: ignore[no-untyped-def]
    _, consumer, _, _ = sides
    endpoint = consumer.kv.endpoint
    consumer.start_load_kv(StepPlan(recvs=[RecvSpec("d", _params(RECV, endpoint, "t4", 30), [1], 0, 10)]))
    consumer.start_load_kv(StepPlan(cancel_recvs=["d"]))
    _, recvd, failed = _wait(consumer, set())
    assert recvd == {"d"} and failed == {"d"}


def test_wrong_shaped_kv_is_rejected(sides) -> None:  # type: ignore[no-untyped-def]
    producer, consumer, _, _ = sides
    endpoint = consumer.kv.endpoint
    consumer.start_load_kv(StepPlan(recvs=[RecvSpec("d", _params(RECV, endpoint, "t5"), [1, 2], 0, 40)]))
    # The producer thinks the prompt has 3 blocks; the consumer planned 2.
    plan = StepPlan(sends=[SendSpec("p", _params(SEND, endpoint, "t5"), [1, 2, 3], 40, 10)])
    _forward(producer, plan)
    _, recvd, failed = _wait(consumer, set())
    assert recvd == {"d"} and failed == {"d"}


async def test_a_load_that_keeps_arriving_is_told_to_the_agent(tmp_path: Path) -> None:
    """A forward pass that saves a layer every 1.2 s: while the load goes on, the consumer's KV
    plane tells the agent's listener that its KV is arriving (as ``KvArriving`` for the job
    waiting for it), so the scheduler does not take the handoff for stalled; after it, nothing."""
    keys = KeySet.create(tmp_path, {"prefill": (), "decode": ()})
    _DECODE_KEY["public"] = read_keypair(keys.key_file("decode")).public

    def security(name: str) -> SecurityConfig:
        return SecurityConfig(key_file=str(keys.key_file(name)), trusted_keys=str(keys.trusted_dir))

    ctx = sockets.new_context()
    agent_security = Security.load(security("decode"))
    listener = ArrivalListener(ctx, "tcp://127.0.0.1:0", agent_security)
    said: list[object] = []
    listener.start(said.append)
    src, dst = _caches(1), _caches(None)
    producer = PdorchWorkerSide(bind=None, security=security("prefill"), same_host=SameHostMode.OFF)
    consumer = PdorchWorkerSide(
        bind="tcp://127.0.0.1:0",
        security=security("decode"),
        same_host=SameHostMode.OFF,
        arrival_notes=listener.endpoint,
    )
    producer.register_kv_caches(src)
    consumer.register_kv_caches(dst)
    try:
        endpoint = consumer.kv.endpoint
        ids = [2, 3, 4, 5]
        listener.watch("prefill/slow", "request-1")
        recv = RecvSpec("d", _params(RECV, endpoint, "slow"), ids, skip_rows=0, num_tokens=100)
        consumer.start_load_kv(StepPlan(recvs=[recv]))
        send = SendSpec("p", _params(SEND, endpoint, "slow"), ids, num_tokens=100, lease_s=10)
        plan = StepPlan(sends=[send])

        def slow_forward() -> None:
            for i in range(LAYERS):
                time.sleep(1.2)
                producer.save_kv_layer(plan, f"model.layers.{i}.attn")
            producer.wait_for_save(plan)

        await asyncio.to_thread(slow_forward)
        _, recvd, failed = await asyncio.to_thread(_wait, consumer, set())
        assert recvd == {"d"} and failed == set()
        for name in src:
            np.testing.assert_array_equal(dst[name][ids], src[name][ids])
        assert said and all(m == KvArriving("request-1") for m in said), said
        heard = len(said)
        await asyncio.sleep(1.5)
        assert len(said) == heard, "nothing once the load is over"
    finally:
        producer.shutdown()
        consumer.shutdown()
        await listener.close()
        agent_security.close()
        ctx.destroy(linger=0)


def test_tensor_parallel_ranks_move_their_own_parts_rank_to_rank(tmp_path: Path) -> None:
    """Two ranks a side, as vLLM's worker processes of two tensor-parallel instances: each consumer
    rank binds rank 0's port + its rank, each producer rank sends its own cache (here its own
    values) to the same rank, under one request route that names rank 0 alone."""
    keys = KeySet.create(tmp_path, {"prefill": (), "decode": ()})
    _DECODE_KEY["public"] = read_keypair(keys.key_file("decode")).public

    def side(name: str, rank: int, bind: str | None) -> PdorchWorkerSide:
        security = SecurityConfig(key_file=str(keys.key_file(name)), trusted_keys=str(keys.trusted_dir))
        return PdorchWorkerSide(bind=bind, security=security, same_host=SameHostMode.OFF, rank=rank)

    endpoint = f"tcp://127.0.0.1:{free_ports(2)}"
    srcs, dsts = [_caches(1), _caches(2)], [_caches(None), _caches(None)]
    producers = [side("prefill", r, None) for r in (0, 1)]
    consumers = [side("decode", r, endpoint) for r in (0, 1)]
    try:
        for r in (0, 1):
            producers[r].register_kv_caches(srcs[r])
            consumers[r].register_kv_caches(dsts[r])
        assert consumers[1].kv.endpoint.endswith(f":{int(endpoint.rsplit(':', 1)[1]) + 1}")
        # A route whose rank endpoint cannot be derived fails nothing in the caller (vLLM's
        # forward pass), only on the KV plane's thread.
        consumers[1].start_load_kv(StepPlan(announce=[_params(RECV, "tcp://127.0.0.1:0", "bad")]))
        recv = RecvSpec("d", _params(RECV, "", "tp"), [7, 8], skip_rows=0, num_tokens=64)
        send = SendSpec("p", _params(SEND, endpoint, "tp"), [1, 2], num_tokens=64, lease_s=10)
        for r in (0, 1):
            consumers[r].start_load_kv(StepPlan(announce=[recv.params], recvs=[recv]))
            _forward(producers[r], StepPlan(sends=[send]))
        for r in (0, 1):
            _, recvd, failed = _wait(consumers[r], set())
            assert recvd == {"d"} and failed == set()
            for name in srcs[r]:
                np.testing.assert_array_equal(dsts[r][name][[7, 8]], srcs[r][name][[1, 2]])
    finally:
        for s in [*producers, *consumers]:
            s.shutdown()
