"""LoRA adapter placement: residency in node views, the adapter-affinity scorer, the adapter-slots
filter, resident-soon bookings, the slo handler's load time, and prefix hashes salted by adapter."""

from __future__ import annotations

import msgspec
import pytest

from scheduler.ledger.ledger import Ledger
from scheduler.placement.config import PlacementConfig
from scheduler.placement.context import Pool, RequestContext
from scheduler.placement.framework import Placer
from scheduler.placement.latency_model import class_key, class_latency, prefill_x
from scheduler.placement.plugins.filters.adapter_slots_filter import (
    AdapterSlotsFilter,
    AdapterSlotsFilterParams,
)
from scheduler.placement.plugins.scorers.adapter_affinity_scorer import (
    AdapterAffinityParams,
    AdapterAffinityScorer,
)
from scheduler.placement.plugins.scorers.prefix_affinity_scorer import (
    PrefixAffinityParams,
    PrefixAffinityScorer,
)
from scheduler.placement.policies import policy
from scheduler.placement.prefix import prompt_block_hashes, salt_block_hashes
from scheduler.placement.types import ClusterSnapshot, NodeView, PlacementRequest
from scheduler.planner import Planner
from scheduler.prediction.latency import LatencyLearner, PrefillSample
from scheduler.prediction.output_length import OutputFeatures, OutputLengthPredictor, PredictorConfig
from tests.support.node_source import NodeSource, sim_hello
from transport.messages import Load, Role


def node(name: str, role: Role = Role.DECODE, **kw: object) -> NodeView:
    kw.setdefault("blocks_total", 10_000)
    kw.setdefault("adapter_slots", 2)
    return NodeView(worker_id=name, role=role, model="m", accelerator="a100", **kw)  # type: ignore[arg-type]


def ctx(adapter: str = "x", pool: Pool = Pool.PREFILL, **req: object) -> RequestContext:
    req.setdefault("prompt_len", 160)
    req.setdefault("max_tokens", 64)
    preq = PlacementRequest(request_id="r1", model="m", adapter=adapter, **req)  # type: ignore[arg-type]
    c = RequestContext(preq, PlacementConfig())
    c.pool = pool
    return c


SCORER = AdapterAffinityScorer(AdapterAffinityParams())

# (label, nodes (resident, in use, prefill wait), adapter, expected best index, expected scores)
SCORER_CASES = [
    ("resident wins over a free slot", [({"x"}, set(), 0.0), (set(), set(), 0.0)], "x", 0),
    ("resident soon (booked) counts as resident", [(set(), set(), 0.0), ({"x", "y"}, {"x"}, 0.0)], "x", 1),
    ("a free slot beats an eviction", [({"a", "b"}, set(), 0.0), ({"a"}, set(), 0.0)], "x", 1),
    ("a queue longer than a load loses to an idle load", [({"x"}, set(), 1.0), (set(), set(), 0.0)], "x", 1),
    ("a queue shorter than a load wins", [({"x"}, set(), 0.02), (set(), set(), 0.0)], "x", 0),
    ("every slot in use scores nothing", [({"a", "b"}, {"a", "b"}, 0.0), ({"a", "b"}, {"a"}, 5.0)], "x", 1),
]


@pytest.mark.parametrize(("label", "spec", "adapter", "best"), SCORER_CASES, ids=[c[0] for c in SCORER_CASES])
def test_adapter_affinity_scorer(label: str, spec: list, adapter: str, best: int) -> None:
    nodes = [
        node(f"n{i}", adapters_resident=frozenset(res), adapters_in_use=frozenset(use), prefill_wait_s=wait)
        for i, (res, use, wait) in enumerate(spec)
    ]
    scores = SCORER.score(ctx(adapter), nodes)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores[best] == 1.0 and all(s < 1.0 for i, s in enumerate(scores) if i != best)


def test_adapter_affinity_has_no_opinion_without_an_adapter_or_slots() -> None:
    nodes = [node("a", adapters_resident=frozenset({"x"})), node("b", prefill_wait_s=3.0)]
    assert SCORER.score(ctx(""), nodes) == [1.0, 1.0]
    unknown = [node("a", adapter_slots=0), node("b", adapter_slots=0)]
    assert SCORER.score(ctx("x"), unknown) == [1.0, 1.0]


def test_adapter_slots_filter_drops_nodes_whose_slots_are_all_in_use() -> None:
    full = node("full", adapters_resident=frozenset({"a", "b"}), adapters_in_use=frozenset({"a", "b"}))
    evictable = node("evictable", adapters_resident=frozenset({"a", "b"}), adapters_in_use=frozenset({"a"}))
    holding = node("holding", adapters_resident=frozenset({"x", "b"}), adapters_in_use=frozenset({"x", "b"}))
    f = AdapterSlotsFilter(AdapterSlotsFilterParams())
    kept = f.filter(ctx("x"), [full, evictable, holding])
    assert [n.worker_id for n in kept] == ["evictable", "holding"]
    assert len(f.filter(ctx(""), [full, evictable, holding])) == 3


# --------------------------------------------------------------------------- the planner, live code


def _planner(
    roles: dict[str, Role], resident: dict[str, list[str]] | None = None, slots: int = 2
) -> tuple[Planner, NodeSource]:
    nodes, ledger = NodeSource(), Ledger()
    config = policy("pdorch")
    for wid, role in roles.items():
        load = Load(blocks_total=10_000, adapter_slots=slots, adapters_resident=(resident or {}).get(wid, []))
        nodes.add(sim_hello(wid, role, adapters=["x", "y", "A", "B"]), load)
        ledger.add_node(wid, "m", "a100", block_size=16, kv_bytes_per_token=1000, capacity_tokens=160_000)
    planner = Planner(
        nodes,
        ledger,
        Placer(config),
        OutputLengthPredictor(PredictorConfig()),
        LatencyLearner(config.accelerators),
        colocated=False,
    )
    return planner, nodes


def _request(planner: Planner, rid: str, adapter: str, prompt: list[int], **kw: object) -> PlacementRequest:
    features = OutputFeatures(prompt_len=len(prompt), max_tokens=64, model="m")
    return planner.request(
        rid,
        features,
        block_hashes=prompt_block_hashes(prompt, 16, adapter),
        prefix_block_tokens=16,
        adapter=adapter,
        ttft_slo_s=5.0,
        tpot_slo_s=0.1,
        **kw,  # type: ignore[arg-type]
    )


def test_node_views_show_reported_and_booked_adapters() -> None:
    planner, _ = _planner({"p": Role.PREFILL, "d": Role.DECODE}, resident={"p": ["y"]})
    placement = planner.decide(_request(planner, "r1", "x", list(range(100))), 0.0, arrived_at=0.0)
    assert placement is not None and (placement.prefill, placement.decode) == ("p", "d")
    views = {v.worker_id: v for v in planner.snapshot(0.0).nodes}
    assert views["p"].adapters_resident == {"x", "y"} and views["p"].adapters_in_use == {"x"}
    assert views["d"].adapters_resident == {"x"} and views["d"].adapter_slots == 2
    planner.release("r1", 1.0)
    views = {v.worker_id: v for v in planner.snapshot(1.0).nodes}
    assert views["p"].adapters_resident == {"y"} and not views["d"].adapters_in_use


def test_the_slo_handler_prefers_the_node_holding_the_adapter() -> None:
    roles = {"p1": Role.PREFILL, "p2": Role.PREFILL, "d1": Role.DECODE, "d2": Role.DECODE}
    for holder in ("1", "2"):
        planner, _ = _planner(roles, resident={f"p{holder}": ["x"], f"d{holder}": ["x"]})
        placement = planner.decide(_request(planner, "r", "x", list(range(100))), 0.0, arrived_at=0.0)
        assert placement is not None
        assert (placement.prefill, placement.decode) == (f"p{holder}", f"d{holder}")


def test_a_burst_for_a_new_adapter_follows_its_first_request() -> None:
    """No node holds the adapter; the first request loads it somewhere, and the ones right behind it,
    before any worker reports it resident, go there too instead of loading it elsewhere (while the
    queue they join there is shorter than a load)."""
    roles = {"p1": Role.PREFILL, "p2": Role.PREFILL, "d1": Role.DECODE, "d2": Role.DECODE}
    planner, _ = _planner(roles)
    placed = []
    for i in range(3):
        placement = planner.decide(_request(planner, f"r{i}", "x", [i] * 100), 0.01 * i, arrived_at=0.01 * i)
        assert placement is not None
        placed.append((placement.prefill, placement.decode))
    assert len(set(placed)) == 1, placed


def test_the_load_time_enters_the_predicted_ttft() -> None:
    roles = {"p1": Role.PREFILL, "d1": Role.DECODE}
    cold, _ = _planner(roles)
    warm, _ = _planner(roles, resident={"p1": ["x"], "d1": ["x"]})
    prompt = list(range(100))
    a = cold.decide(_request(cold, "r", "x", prompt), 0.0, arrived_at=0.0)
    b = warm.decide(_request(warm, "r", "x", prompt), 0.0, arrived_at=0.0)
    assert a is not None and b is not None
    load_s = PlacementConfig().accelerators["a100"].adapter_load_s
    assert a.predicted_ttft_s == pytest.approx(b.predicted_ttft_s + load_s)
    assert a.predicted_tpot_s > b.predicted_tpot_s  # the decode node loads it before its first step


# --------------------------------------------------------------------------- salted prefix hashes


def test_prefix_affinity_is_per_adapter() -> None:
    """The same prompt under adapter A has affinity to the node that served it under A, and none
    under adapter B or the base model."""
    roles = {"p1": Role.PREFILL, "p2": Role.PREFILL, "d1": Role.DECODE}
    planner, _ = _planner(roles, slots=0)  # no residency: only the prefix decides
    prompt = list(range(320))
    first = planner.decide(_request(planner, "r1", "A", prompt), 0.0, arrived_at=0.0)
    assert first is not None
    served = first.prefill
    snapshot: ClusterSnapshot = planner.snapshot(0.0)
    scorer = PrefixAffinityScorer(PrefixAffinityParams())
    prefill_nodes = [n for n in snapshot.nodes if n.role is Role.PREFILL]
    for adapter, expect_hit in (("A", True), ("B", False), ("", False)):
        c = RequestContext(_request(planner, "r2", adapter, prompt), planner.config)
        scores = dict(zip((n.worker_id for n in prefill_nodes), scorer.score(c, prefill_nodes), strict=True))
        assert (scores[served] == 1.0) is expect_hit, adapter
        assert all(s == 0.0 for wid, s in scores.items() if wid != served)


def test_salted_trace_hashes_keep_chains_per_adapter() -> None:
    ids = (1, 2, 3)
    a, a2, b = salt_block_hashes(ids, "A"), salt_block_hashes(ids, "A"), salt_block_hashes(ids, "B")
    assert a == a2 and not set(a) & set(b) and not set(a) & set(ids)
    assert salt_block_hashes(ids, "") == ids
    assert prompt_block_hashes(list(range(32)), 16, "A") != prompt_block_hashes(list(range(32)), 16)


def test_the_learner_takes_the_unexplained_part_of_cold_prefills_as_the_load_time() -> None:
    learner = LatencyLearner(PlacementConfig().accelerators)
    for i in range(200):
        tokens = 500 + 10 * (i % 50)
        seconds = 0.01 + tokens * 1e-4
        warm = PrefillSample("m", "a100", tokens, 0, 0.0, 0.0, seconds)
        learner.observe_prefill(warm)
        learner.observe_prefill(msgspec.structs.replace(warm, seconds=seconds + 0.3, adapter_load=True))
    table = learner.table(0.0)
    assert table.adapter_load_s[class_key("m", "a100")] == pytest.approx(0.3, rel=0.1)
    # The cold samples did not teach the prefill model their load.
    model = class_latency(table, "m", "a100", PlacementConfig().accelerators).prefill
    assert model.predict(prefill_x(700, 0, 0.0, 0.0)) == pytest.approx(0.01 + 0.07, rel=0.1)


@pytest.mark.parametrize("name", ["round-robin", "least-request", "pdorch"])
def test_every_policy_places_only_on_nodes_serving_the_adapter(name: str) -> None:
    planner, nodes = _planner({"p1": Role.PREFILL, "p2": Role.PREFILL, "d1": Role.DECODE, "d2": Role.DECODE})
    planner.placer = Placer(policy(name))
    for wid in ("p1", "d2"):  # these serve only "y"
        state = nodes.states[wid]
        nodes.states[wid] = state._replace(hello=msgspec.structs.replace(state.hello, adapters=["y"]))
    for i in range(6):
        placement = planner.decide(_request(planner, f"r{i}", "x", [i] * 64), 0.0, arrived_at=0.0)
        assert placement is not None and (placement.prefill, placement.decode) == ("p2", "d1")


@pytest.mark.parametrize(("queued_tokens", "expected"), [(150, "p1"), (3000, "p2")])
def test_the_slo_handler_weighs_a_load_against_the_queue_of_the_node_holding_the_adapter(
    queued_tokens: int, expected: str
) -> None:
    """p1 holds the adapter behind a queue: shorter than a load (~0.05 s), p1 still wins; about a
    second, the idle p2 that must load it wins."""
    roles = {"p1": Role.PREFILL, "p2": Role.PREFILL, "d1": Role.DECODE}
    planner, nodes = _planner(roles, resident={"p1": ["x"], "d1": ["x"]})
    busy = nodes.states["p1"]
    load = msgspec.structs.replace(busy.load, queued_prefill_tokens=queued_tokens)
    nodes.states["p1"] = busy._replace(load=load)
    placement = planner.decide(_request(planner, "r", "x", list(range(100))), 0.0, arrived_at=0.0)
    assert placement is not None and placement.prefill == expected
