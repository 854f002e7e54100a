"""Sampled placement in a large cluster: which nodes a decision looks at, and when it looks at all."""

from __future__ import annotations

import msgspec
import pytest

from scheduler.ledger.ledger import Ledger
from scheduler.placement.framework import Placer
from scheduler.placement.policies import policy
from scheduler.placement.sample import PROBE_EVERY, WHOLE_REMEMBERED, Holds, NodeSampler
from scheduler.placement.types import PlacementRequest
from scheduler.planner import Planner
from scheduler.prediction.latency import LatencyLearner
from scheduler.prediction.output_length import OutputLengthPredictor
from tests.support.node_source import NodeSource, sim_hello
from transport.messages import Hello, Load, Role


def request(rid: str = "r1", block_hashes: tuple[int, ...] = ()) -> PlacementRequest:
    return PlacementRequest(
        request_id=rid, model="m", prompt_len=64, max_tokens=16, block_hashes=block_hashes
    )


def hello(wid: str, role: Role, accelerator: str = "a100") -> Hello:
    return sim_hello(wid, role, accelerator, kv_endpoint="tcp://127.0.0.1:1")


def nodes(prefill: int, decode: int, accelerator: str = "a100") -> list[Hello]:
    return [hello(f"p{accelerator}{i}", Role.PREFILL, accelerator) for i in range(prefill)] + [
        hello(f"d{accelerator}{i}", Role.DECODE, accelerator) for i in range(decode)
    ]


def no_prefixes(worker_id: str) -> Holds:
    return frozenset().__contains__


def idle(worker_id: str, prefill: bool) -> int:
    return 0


def sample(
    preq: PlacementRequest, cluster: list[Hello], k: int, holds=no_prefixes, busy=idle, exclude=frozenset()
) -> frozenset[str] | None:
    return NodeSampler(k, seed=0).sample(preq, cluster, holds, busy, exclude)


def test_a_small_cluster_or_k_zero_is_looked_at_whole() -> None:
    assert sample(request(), nodes(8, 8), 8) is None
    assert sample(request(), nodes(30, 30), 0) is None
    # Eight of each class in each pool: still whole, however many nodes in all.
    assert sample(request(), nodes(8, 8) + nodes(8, 8, "h100"), 8) is None
    # Another model's nodes are not this one's.
    other = [msgspec.structs.replace(h, model="other") for h in nodes(30, 30, "l40s")]
    assert sample(request(), nodes(8, 8) + other, 8) is None


def test_k_of_each_pool_drawn_by_the_request() -> None:
    cluster = nodes(20, 30)
    chosen = sample(request(), cluster, 4)
    assert chosen is not None
    assert len([w for w in chosen if w.startswith("p")]) == 4
    assert len([w for w in chosen if w.startswith("d")]) == 4
    # The same request draws the same nodes (the decision is pure), whatever order they come in,
    # from a sampler that has seen other clusters before.
    sampler = NodeSampler(4, seed=0)
    sampler.sample(request(), nodes(20, 20, "h100"), no_prefixes, idle)
    assert sampler.sample(request(), cluster[::-1], no_prefixes, idle) == chosen
    # Other requests draw others: over many, every node is looked at.
    seen: set[str] = set()
    for i in range(200):
        seen |= sampler.sample(request(f"r{i}"), cluster, no_prefixes, idle) or frozenset()
    assert seen == {h.worker_id for h in cluster}
    # Nodes excluded (tried already, not serving the adapter) are never drawn.
    out = frozenset(h.worker_id for h in cluster[::2])
    for i in range(50):
        assert not (sampler.sample(request(f"r{i}"), cluster, no_prefixes, idle, out) or frozenset()) & out


def test_a_small_class_is_never_left_out() -> None:
    sampler = NodeSampler(4, seed=0)
    cluster = nodes(20, 20)
    assert not {"fast0", "fast1", "fast2"} & (
        sampler.sample(request(), cluster, no_prefixes, idle) or frozenset()
    )
    # They join: the sampler sees the new nodes at its next decision.
    cluster += [hello(f"fast{i}", Role.DECODE, "h100") for i in range(3)]
    for i in range(20):
        chosen = sampler.sample(request(f"r{i}"), cluster, no_prefixes, idle)
        assert chosen is not None and {"fast0", "fast1", "fast2"} <= chosen


def test_both_nodes_count_in_either_pool() -> None:
    cluster = [hello(f"b{i}", Role.BOTH) for i in range(12)]
    chosen = sample(request(), cluster, 4)
    assert chosen is not None and 4 <= len(chosen) <= 8


def test_the_nodes_holding_the_most_of_the_prefix_are_looked_at() -> None:
    cluster = nodes(40, 40)
    hashes = tuple(range(100, 120))
    held = {
        "pa1003": frozenset(hashes),  # the whole prompt
        "da1007": frozenset(hashes[:15]),  # three quarters of it
        "pa1009": frozenset(hashes[:2]),  # only its start: deeper holders come first
    }

    def holds(wid: str) -> Holds:
        return held.get(wid, frozenset()).__contains__

    for i in range(10):
        chosen = sample(request(f"r{i}", hashes), cluster, 2, holds)
        assert chosen is not None and {"pa1003", "da1007"} <= chosen


# ---------------------------------------------------------------------------- the planner


def _planner(
    prefill: int, decode: int, sample: int, lend: bool = True, name: str = "pdorch"
) -> tuple[Planner, NodeSource]:
    source, ledger = NodeSource(), Ledger()
    config = msgspec.structs.replace(policy(name), sample=sample, fallback_to_prefill_node=lend)
    for h in [hello(f"p{i}", Role.PREFILL) for i in range(prefill)] + [
        hello(f"d{i}", Role.DECODE) for i in range(decode)
    ]:
        source.add(h, Load(blocks_total=10_000))
        ledger.add_node(
            h.worker_id, "m", "a100", block_size=16, kv_bytes_per_token=1000, capacity_tokens=160_000
        )
    planner = Planner(
        source,
        ledger,
        Placer(config),
        OutputLengthPredictor(),
        LatencyLearner(config.accelerators),
        colocated=False,
    )
    return planner, source


def drawn(preq: PlacementRequest, source: NodeSource, k: int) -> frozenset[str]:
    chosen = sample(preq, [s.hello for s in source.node_states()], k)
    assert chosen is not None
    return chosen


def test_a_decision_in_a_large_cluster_looks_at_its_sample() -> None:
    planner, source = _planner(12, 12, sample=3)
    for i in range(20):
        preq = request(f"r{i}")
        chosen = drawn(preq, source, 3)
        placement = planner.place(preq, 0.0, arrived_at=0.0)
        assert {placement.prefill, placement.decode} <= chosen
    assert planner.scope == {"sample": 20}


@pytest.mark.parametrize("lend", [True, False], ids=["sample-would-lend", "sample-would-wait"])
def test_when_the_sample_has_no_room_every_node_is_looked_at(lend: bool) -> None:
    planner, source = _planner(12, 12, sample=3, lend=lend)
    preq = request("r1")
    chosen = drawn(preq, source, 3)
    # Every decode node is full but one the request's sample left out. On the sample, the request
    # would be decoded by a prefill node lent to the other phase (lend) or wait for room (not).
    roomy = next(f"d{i}" for i in range(12) if f"d{i}" not in chosen)
    for wid, state in source.states.items():
        if wid.startswith("d") and wid != roomy:
            source.states[wid] = state._replace(load=Load(blocks_total=10_000, blocks_used=10_000))
    placement = planner.place(preq, 0.0, arrived_at=0.0)
    assert placement.decode == roomy and not placement.colocated
    assert planner.scope == {"all": 1}


def test_without_sampling_every_decision_looks_at_every_node() -> None:
    planner, _ = _planner(12, 12, sample=0)
    for i in range(5):
        planner.place(request(f"r{i}"), 0.0, arrived_at=0.0)
    assert planner.scope == {"all": 5}


@pytest.mark.parametrize("name", ["pdorch-pd", "least-request", "round-robin"])
def test_the_pd_handler_looks_at_every_node(name: str) -> None:
    # Its decider keeps requests local on purpose, and a round-robin over a sample is no round-robin.
    planner, _ = _planner(12, 12, sample=3, name=name)
    for i in range(5):
        planner.place(request(f"r{i}"), 0.0, arrived_at=0.0)
    assert planner.scope == {"all": 5}


def test_a_request_its_sample_could_not_take_is_looked_at_whole_after() -> None:
    sampler = NodeSampler(4, seed=0)
    cluster = nodes(20, 20)
    assert sampler.sample(request("r1"), cluster, no_prefixes, idle) is not None
    sampler.record("r1", stood=False)
    # Its sample would be the same nodes again: its next decisions (it waits) look at every node.
    assert sampler.sample(request("r1"), cluster, no_prefixes, idle) is None
    assert sampler.sample(request("r2"), cluster, no_prefixes, idle) is not None
    # Bounded: the oldest are forgotten (and only take their sample again).
    for i in range(WHOLE_REMEMBERED):
        sampler.record(f"y{i}", stood=False)
    for i in range(100):  # and samples stand again
        sampler.record(f"x{i}", stood=True)
    assert sampler.sample(request("r1"), cluster, no_prefixes, idle) is not None


def test_while_samples_mostly_fail_few_decisions_take_one() -> None:
    sampler = NodeSampler(4, seed=0)
    cluster = nodes(20, 20)
    for i in range(30):  # pools short of room: every sample fails
        sampler.sample(request(f"a{i}"), cluster, no_prefixes, idle)
        sampler.record(f"a{i}", stood=False)
    assert sampler.stood_rate < 0.5
    taken = [
        sampler.sample(request(f"b{i}"), cluster, no_prefixes, idle) is not None
        for i in range(4 * PROBE_EVERY)
    ]
    assert sum(taken) == 4  # one probe in PROBE_EVERY
    # Room again: the probes' samples stand, and soon every decision takes one.
    for i in range(200):
        if sampler.sample(request(f"c{i}"), cluster, no_prefixes, idle) is not None:
            sampler.record(f"c{i}", stood=True)
    assert sampler.stood_rate > 0.5
    assert all(sampler.sample(request(f"d{i}"), cluster, no_prefixes, idle) is not None for i in range(20))


def test_half_of_each_class_is_the_least_busy() -> None:
    cluster = nodes(20, 20)
    # The ledger's counts: prompt tokens queued on each prefill node, decoding on each decode node.
    load = {h.worker_id: 1000 + i for i, h in enumerate(cluster)}
    load.update({"pa10013": 5, "pa1007": 9, "da10011": 0, "da1002": 3})

    def busy(worker_id: str, prefill: bool) -> int:
        return load[worker_id]

    for i in range(20):
        chosen = sample(request(f"r{i}"), cluster, 4, busy=busy)
        assert chosen is not None and {"pa10013", "pa1007", "da10011", "da1002"} <= chosen
        assert len(chosen) == 8  # and two more of each pool at random
