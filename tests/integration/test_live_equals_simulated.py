"""Live placement == simulated placement: the same events, fed to the live scheduler's worker registry
and planner and to the simulator's nodes, give the same decisions.

The simulator replays a trace on a mixed cluster (H100 prefill, A100 decode). Every call its
scheduler side makes — building a request, deciding (with the loads its engines report at that
instant), a first token, a KV landing, a reservation growing, a finish, a release, the predictor
learning a length — is recorded. The same sequence is then fed to a live ``Cluster`` (each worker
registered with the simulated node's ``Hello``, its load set as a heartbeat sets it) and a fresh
``Planner``. Every request it builds, every node view it shows placement and every decision it takes
(including the ones that wait or shed) must equal the simulator's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from scheduler.cluster import Cluster
from scheduler.config import SchedulerConfig
from scheduler.placement.config import PlacementConfig
from scheduler.placement.framework import Placer
from scheduler.placement.policies import is_colocated, policy
from scheduler.placement.types import ClusterSnapshot, NodeView
from scheduler.planner import Planner
from scheduler.prediction.latency import LatencyLearner
from scheduler.prediction.output_length import OutputLengthPredictor
from simulate.cluster import parse_cluster
from simulate.runner import SimConfig, Simulation
from simulate.synthetic import synthetic_trace
from transport.errors import PdorchError

TRACE = synthetic_trace(240, rate_per_s=18.0, seed=3, prompt_median=2500, output_median=60)
CLUSTER = parse_cluster(["2:h100x4"], ["2:a100x4"])
LIFECYCLE = ("first_token", "kv_loaded", "grow", "finished", "release", "observe")


def _frozen(snapshot: ClusterSnapshot) -> tuple[NodeView, ...]:
    """The views as plain values (a prefix view may only be read while its memory is unchanged)."""
    return tuple(
        msgspec.structs.replace(n, cached_block_hashes=frozenset(n.cached_block_hashes))
        for n in snapshot.nodes
    )


class Recorder:
    """Stands in for the simulator's planner: forwards every call and records it, in order."""

    def __init__(self, sim: Simulation) -> None:
        self._sim = sim
        self._planner = sim.planner
        self.events: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._planner, name)
        if name == "request":
            return self._recorded("request", attr)
        if name in LIFECYCLE:
            return self._recorded(name, attr)
        return attr

    def _recorded(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            result = fn(*args, **kwargs)
            self.events.append((name, args, kwargs, result))
            return result

        return call

    def decide(self, preq: Any, now: float, **kwargs: Any) -> Any:
        loads = {s.hello.worker_id: s.load for s in self._sim.node_states()}
        views = _frozen(self._planner.snapshot(now))
        try:
            result = self._planner.decide(preq, now, **kwargs)
        except PdorchError as e:  # shed
            self.events.append(("decide", (preq, now), kwargs, (loads, views, e.code)))
            raise
        self.events.append(("decide", (preq, now), kwargs, (loads, views, result)))
        return result


def _live_default() -> PlacementConfig:
    """The placement of a scheduler config that does not set one."""
    return msgspec.convert({"security": {"insecure": True}}, SchedulerConfig).placement


def test_the_live_default_is_the_policy_the_simulator_measures() -> None:
    assert _live_default() == policy("pdorch")
    # A config file that sets one field keeps the other defaults (a prefill node may still decode).
    raw = {"security": {"insecure": True}, "placement": {"seed": 3}}
    partial = msgspec.convert(raw, SchedulerConfig).placement
    assert msgspec.structs.replace(partial, seed=0) == policy("pdorch")


@pytest.mark.parametrize("name", ["pdorch", "pdorch-pd", "round-robin"])
def test_the_live_scheduler_decides_as_the_simulator_did(name: str) -> None:
    config = policy(name, tpot_target_s=0.1, kv_link_gbytes_per_s=100.0)
    sim = Simulation(TRACE, CLUSTER, config, config=SimConfig(), policy_name=name, rate_scale=1.0)
    recorder = Recorder(sim)
    sim.planner = recorder  # type: ignore[assignment]
    result = sim.run()
    decisions = [e for e in recorder.events if e[0] == "decide"]
    placed = [e for e in decisions if e[3][2] is not None and not isinstance(e[3][2], str)]
    assert len(placed) == result.finished + result.failed - result.shed > 0
    if name == "pdorch":  # the run exercised waiting and, for some, shedding
        assert len(decisions) > len(placed)

    cluster = Cluster(heartbeat_interval_s=1.0, heartbeat_liveness=10**6, on_lost=lambda *_: None)
    for node in sim.nodes:
        cluster.register(node.worker_id.encode(), node.hello, now=0.0)
    # pdorch: the live scheduler's own default, which must be the policy the simulator measures.
    placer = Placer(_live_default() if name == "pdorch" else config)
    live = Planner(
        cluster,
        cluster.ledger,
        placer,
        OutputLengthPredictor(sim.config.predictor),
        LatencyLearner(placer.config.accelerators),
        colocated=is_colocated(placer.config),
    )
    for kind, args, kwargs, recorded in recorder.events:
        if kind == "decide":
            preq, now = args
            loads, views, outcome = recorded
            for worker_id, load in loads.items():
                cluster.get(worker_id).load = load  # type: ignore[union-attr]  # as a heartbeat does
            assert _frozen(live.snapshot(now)) == views, f"what placement sees at {now:.3f}s"
            try:
                got: Any = live.decide(preq, now, **kwargs)
            except PdorchError as e:
                got = e.code
            assert got == outcome, f"the decision for request {preq.request_id} at {now:.3f}s"
        else:
            got = getattr(live, kind)(*args, **kwargs)
            if kind == "request":
                assert got == recorded, "the request placement is asked to place"
