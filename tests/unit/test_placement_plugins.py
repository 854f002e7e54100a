"""Table-driven tests of every placement plugin: filters, scorers, pickers."""

from __future__ import annotations

import msgspec
import pytest

from scheduler.placement.config import PlacementConfig, ReservationConfig, ReservationMode
from scheduler.placement.context import Pool, RequestContext
from scheduler.placement.plugin import Scorer
from scheduler.placement.plugins.filters.health_filter import HealthFilter, HealthFilterParams
from scheduler.placement.plugins.filters.prefill_backlog_filter import (
    PrefillBacklogFilter,
    PrefillBacklogParams,
)
from scheduler.placement.plugins.filters.role_filter import RoleFilter, RoleFilterParams
from scheduler.placement.plugins.pickers.max_score_picker import MaxScoreParams, MaxScorePicker
from scheduler.placement.plugins.pickers.random_picker import RandomParams, RandomPicker
from scheduler.placement.plugins.pickers.round_robin_picker import RoundRobinParams, RoundRobinPicker
from scheduler.placement.plugins.pickers.weighted_random_picker import (
    WeightedRandomParams,
    WeightedRandomPicker,
)
from scheduler.placement.plugins.scorers.accelerator_scorer import AcceleratorScorer, AcceleratorScorerParams
from scheduler.placement.plugins.scorers.active_requests_scorer import (
    ActiveRequestsParams,
    ActiveRequestsScorer,
)
from scheduler.placement.plugins.scorers.kv_occupancy_scorer import KvOccupancyParams, KvOccupancyScorer
from scheduler.placement.plugins.scorers.prefill_delay_scorer import PrefillDelayParams, PrefillDelayScorer
from scheduler.placement.plugins.scorers.prefix_affinity_scorer import (
    PrefixAffinityParams,
    PrefixAffinityScorer,
)
from scheduler.placement.plugins.scorers.queue_scorer import QueueScorer, QueueScorerParams
from scheduler.placement.types import NodeView, PlacementRequest
from transport.messages import Role


def node(name: str, role: Role = Role.DECODE, **kw: object) -> NodeView:
    kw.setdefault("blocks_total", 1000)
    return NodeView(worker_id=name, role=role, model="m", **kw)  # type: ignore[arg-type]


def ctx(pool: Pool = Pool.DECODE, config: PlacementConfig | None = None, **req: object) -> RequestContext:
    req.setdefault("prompt_len", 160)
    req.setdefault("max_tokens", 64)
    c = RequestContext(PlacementRequest(request_id="r1", model="m", **req), config or PlacementConfig())  # type: ignore[arg-type]
    c.pool = pool
    return c


def names(nodes: list[NodeView]) -> list[str]:
    return [n.worker_id for n in nodes]


# --------------------------------------------------------------------------- filters

ROLE_CASES = [
    # (pool, prefer_dedicated, roles, expected)
    (Pool.PREFILL, True, {"p": Role.PREFILL, "d": Role.DECODE, "b": Role.BOTH}, ["p"]),
    (Pool.PREFILL, False, {"p": Role.PREFILL, "d": Role.DECODE, "b": Role.BOTH}, ["p", "b"]),
    (Pool.DECODE, True, {"p": Role.PREFILL, "d": Role.DECODE, "b": Role.BOTH}, ["d"]),
    (Pool.DECODE, True, {"p": Role.PREFILL, "b": Role.BOTH}, ["b"]),
    (Pool.PREFILL, True, {"d": Role.DECODE}, []),
]


@pytest.mark.parametrize(("pool", "dedicated", "roles", "expected"), ROLE_CASES)
def test_role_filter(pool: Pool, dedicated: bool, roles: dict[str, Role], expected: list[str]) -> None:
    nodes = [node(n, r) for n, r in roles.items()]
    f = RoleFilter(RoleFilterParams(prefer_dedicated=dedicated))
    assert names(f.filter(ctx(pool), nodes)) == expected


@pytest.mark.parametrize(
    ("allow_prefill", "roles", "expected"),
    [
        (False, {"p": Role.PREFILL, "d": Role.DECODE}, []),
        (True, {"p": Role.PREFILL, "d": Role.DECODE}, ["p"]),
        (True, {"p": Role.PREFILL, "b": Role.BOTH}, ["b"]),
    ],
)
def test_role_filter_in_colocated_fallback(
    allow_prefill: bool, roles: dict[str, Role], expected: list[str]
) -> None:
    config = PlacementConfig(fallback_to_prefill_node=allow_prefill)
    c = ctx(Pool.DECODE, config)
    c.fallback = True
    nodes = [node(n, r) for n, r in roles.items()]
    assert names(RoleFilter(RoleFilterParams()).filter(c, nodes)) == expected


PROMPT_ONLY = PlacementConfig(reservation=ReservationConfig(mode=ReservationMode.PROMPT))


@pytest.mark.parametrize(
    ("params", "pool", "nodes", "expected"),
    [
        (HealthFilterParams(), Pool.DECODE, [node("a", draining=True), node("b")], ["b"]),
        # 160 prompt tokens = 10 blocks of 16: "full" has 9 free, "ok" exactly 10.
        (
            HealthFilterParams(require_kv_room=True),
            Pool.DECODE,
            [node("full", blocks_total=100, blocks_used=91), node("ok", blocks_total=100, blocks_used=90)],
            ["ok"],
        ),
        (
            HealthFilterParams(require_kv_room=True),
            Pool.DECODE,
            [
                node("resv", blocks_total=100, blocks_used=80, blocks_reserved=11),
                node("none", blocks_total=0),
            ],
            [],
        ),
        # KV room is a decode-side condition only.
        (
            HealthFilterParams(require_kv_room=True),
            Pool.PREFILL,
            [node("full", blocks_total=10, blocks_used=10)],
            ["full"],
        ),
        (HealthFilterParams(max_waiting=2), Pool.DECODE, [node("a", waiting=3), node("b", waiting=2)], ["b"]),
    ],
)
def test_health_filter(
    params: HealthFilterParams, pool: Pool, nodes: list[NodeView], expected: list[str]
) -> None:
    assert names(HealthFilter(params).filter(ctx(pool, PROMPT_ONLY), nodes)) == expected


@pytest.mark.parametrize(
    ("nodes", "fallback", "expected"),
    [
        # Another decode node can take it: the one handoffs did not land on is left out.
        ([node("cut", kv_unreachable=True), node("ok")], False, ["ok"]),
        # A prefill node can run it whole: left out too, even as the only decode node.
        ([node("cut", kv_unreachable=True)], True, []),
        # No other way: tried rather than the request refused (its handoff is the probe).
        ([node("cut", kv_unreachable=True)], False, ["cut"]),
        # A refusing one never (its worker says it has no room), whatever else there is.
        ([node("cut", kv_unreachable=True), node("busy", kv_refusing=True)], False, ["cut"]),
    ],
)
def test_the_health_filter_leaves_out_a_decode_node_handoffs_did_not_land_on_while_there_is_another_way(
    nodes: list[NodeView], fallback: bool, expected: list[str]
) -> None:
    config = PlacementConfig(fallback_to_prefill_node=fallback)
    assert names(HealthFilter(HealthFilterParams()).filter(ctx(Pool.DECODE, config), nodes)) == expected
    assert names(HealthFilter(HealthFilterParams()).filter(ctx(Pool.PREFILL, config), nodes)) == names(nodes)


def test_room_counts_the_other_choices() -> None:
    """A request with ``n`` choices needs room for the others beside it: each a copy of the prompt's
    last, partial block and its output. 160 + 64 tokens = 14 blocks; 3 followers: 3 + 192 / 16 = 15."""
    config = PlacementConfig(reservation=ReservationConfig(mode=ReservationMode.MAX_TOKENS))
    alone, with_three = ctx(config=config), ctx(config=config, followers=3)
    fits, short = (
        node("fits", blocks_total=100, blocks_used=71),
        node("short", blocks_total=100, blocks_used=72),
    )
    assert alone.has_room(short) and with_three.has_room(fits) and not with_three.has_room(short)
    room = HealthFilter(HealthFilterParams(require_kv_room=True))
    assert names(room.filter(with_three, [short, fits])) == ["fits"]


def test_other_choices_count_at_the_mean_and_at_most_a_whole_node() -> None:
    config = PlacementConfig(reservation=ReservationConfig(mode=ReservationMode.MAX_TOKENS))
    # Their outputs at the predicted mean (20 tokens): 3 + 60 / 16 -> 7 blocks beside the 14.
    predicted = ctx(config=config, followers=3, predicted_output_len=20)
    assert predicted.has_room(node("a", blocks_total=100, blocks_used=79))
    assert not predicted.has_room(node("b", blocks_total=100, blocks_used=80))
    # 127 choices cannot all fit in 100 blocks: the request takes a node that is empty.
    many = ctx(config=config, followers=127)
    assert many.has_room(node("empty", blocks_total=100))
    assert not many.has_room(node("one used", blocks_total=100, blocks_used=1))


@pytest.mark.parametrize(
    ("params", "nodes", "hashes", "expected"),
    [
        # rate 1000 tokens/s: 50 queued -> 0.05 s (kept), 200 queued -> 0.2 s (dropped).
        (
            PrefillBacklogParams(max_wait_s=0.1),
            [node("a", queued_prefill_tokens=50), node("b", queued_prefill_tokens=200)],
            (),
            ["a"],
        ),
        # b holds 2 x 16 cached tokens of the prompt: 232 - 32 = 200 -> still over 0.1 s;
        # c's 120 - 32 is under.
        (
            PrefillBacklogParams(max_wait_s=0.1),
            [
                node("b", queued_prefill_tokens=232, cached_block_hashes=frozenset({1, 2})),
                node("c", queued_prefill_tokens=120, cached_block_hashes=frozenset({1, 2})),
            ],
            (1, 2),
            ["c"],
        ),
        # relative: may wait up to 1x its own 160-token prefill (0.16 s).
        (
            PrefillBacklogParams(max_wait_s=0.0, relative=1.0),
            [node("a", queued_prefill_tokens=150), node("b", queued_prefill_tokens=170)],
            (),
            ["a"],
        ),
    ],
)
def test_prefill_backlog_filter(
    params: PrefillBacklogParams, nodes: list[NodeView], hashes: tuple[int, ...], expected: list[str]
) -> None:
    nodes = [msgspec.structs.replace(n, role=Role.PREFILL, prefill_tokens_per_s=1000.0) for n in nodes]
    f = PrefillBacklogFilter(params)
    assert names(f.filter(ctx(Pool.PREFILL, block_hashes=hashes), nodes)) == expected
    assert len(f.filter(ctx(Pool.DECODE, block_hashes=hashes), nodes)) == len(nodes)  # decode pool untouched


# --------------------------------------------------------------------------- scorers

SCORER_CASES = [
    (
        "kv-occupancy counts reservations",
        KvOccupancyScorer(KvOccupancyParams()),
        [
            node("a", blocks_used=250, blocks_reserved=250),
            node("b", blocks_used=0),
            node("c", blocks_total=0),
        ],
        {},
        [0.5, 1.0, 0.0],
    ),
    (
        "kv-occupancy, reported usage only",
        KvOccupancyScorer(KvOccupancyParams(include_reserved=False)),
        [node("a", blocks_used=250, blocks_reserved=250)],
        {},
        [0.75],
    ),
    (
        "queue: waiting, min-max",
        QueueScorer(QueueScorerParams()),
        [node("a", waiting=0), node("b", waiting=5), node("c", waiting=10)],
        {},
        [1.0, 0.5, 0.0],
    ),
    (
        "queue: prefill tokens",
        QueueScorer(QueueScorerParams(signal="prefill-tokens")),
        [node("a", queued_prefill_tokens=100), node("b", queued_prefill_tokens=300)],
        {},
        [1.0, 0.0],
    ),
    (
        "queue: all equal",
        QueueScorer(QueueScorerParams()),
        [node("a", waiting=3), node("b", waiting=3)],
        {},
        [1.0, 1.0],
    ),
    (
        "active requests",
        ActiveRequestsScorer(ActiveRequestsParams()),
        [node("a", inflight=4), node("b", inflight=0)],
        {},
        [0.0, 1.0],
    ),
    (
        "prefix affinity: chain stops at first miss",
        PrefixAffinityScorer(PrefixAffinityParams()),
        [
            node("all", cached_block_hashes=frozenset({1, 2, 3, 4})),
            node("half", cached_block_hashes=frozenset({1, 2, 4})),
            node("gap", cached_block_hashes=frozenset({2, 3, 4})),
        ],
        {"prompt_len": 64, "block_hashes": (1, 2, 3, 4)},
        [1.0, 0.5, 0.0],
    ),
    (
        "prefix affinity: no hashes",
        PrefixAffinityScorer(PrefixAffinityParams()),
        [node("a", cached_block_hashes=frozenset({1}))],
        {},
        [0.0],
    ),
    (
        "prefill delay: queue and cache (rate 1000/s)",
        PrefillDelayScorer(PrefillDelayParams()),
        [
            node("idle", prefill_tokens_per_s=1000.0),
            node("busy", queued_prefill_tokens=64, prefill_tokens_per_s=1000.0),
            node(
                "cached",
                queued_prefill_tokens=64,
                prefill_tokens_per_s=1000.0,
                cached_block_hashes=frozenset({1, 2}),
            ),
        ],
        {"prompt_len": 64, "block_hashes": (1, 2, 3, 4)},
        [1.0, 0.5, 2 / 3],
    ),
    (
        "prefill delay: faster node wins",
        PrefillDelayScorer(PrefillDelayParams()),
        [node("slow", prefill_tokens_per_s=1000.0), node("fast", prefill_tokens_per_s=4000.0)],
        {},
        [0.25, 1.0],
    ),
]


@pytest.mark.parametrize(
    ("label", "scorer", "nodes", "req", "expected"), SCORER_CASES, ids=[c[0] for c in SCORER_CASES]
)
def test_scorers(label: str, scorer: Scorer, nodes: list[NodeView], req: dict, expected: list[float]) -> None:
    scores = scorer.score(ctx(Pool.DECODE, **req), nodes)
    assert scores == pytest.approx(expected)
    assert all(0.0 <= s <= 1.0 for s in scores)


@pytest.mark.parametrize(
    ("pool", "expected"),
    [
        # prefill: TFLOPS share (h100 989 is the best); decode: HBM bytes per FLOP (a100 is the best).
        (Pool.PREFILL, [312 / 989, 1.0, 0.0]),
        (Pool.DECODE, [1.0, (3350 / 989) / (2039 / 312), 0.0]),
    ],
)
def test_accelerator_scorer(pool: Pool, expected: list[float]) -> None:
    nodes = [node("a", accelerator="a100"), node("h", accelerator="h100"), node("x", accelerator="unknown")]
    scores = AcceleratorScorer(AcceleratorScorerParams()).score(ctx(pool), nodes)
    assert scores == pytest.approx(expected)


# --------------------------------------------------------------------------- pickers


def test_max_score_picks_the_best() -> None:
    nodes = [node("a"), node("b"), node("c")]
    assert MaxScorePicker(MaxScoreParams()).pick(ctx(), nodes, [0.2, 0.9, 0.5]).worker_id == "b"


def test_max_score_breaks_ties_by_request_not_position() -> None:
    nodes = [node(f"n{i}") for i in range(4)]
    picker = MaxScorePicker(MaxScoreParams())
    picks = set()
    for i in range(40):
        c = RequestContext(PlacementRequest(f"r{i}", "m", 10, 10), PlacementConfig())
        picks.add(picker.pick(c, nodes, [1.0, 1.0, 1.0, 0.0]).worker_id)
    assert picks == {"n0", "n1", "n2"}
    # ... and the same request always gets the same node.
    c = ctx()
    assert len({picker.pick(c, nodes, [1.0] * 4).worker_id for _ in range(5)}) == 1


def test_random_picker_is_seeded_by_request_and_config() -> None:
    nodes = [node(f"n{i}") for i in range(8)]
    picker = RandomPicker(RandomParams())
    first = [
        picker.pick(RequestContext(PlacementRequest(f"r{i}", "m", 1, 1), PlacementConfig()), nodes, [0.0] * 8)
        for i in range(30)
    ]
    again = [
        picker.pick(RequestContext(PlacementRequest(f"r{i}", "m", 1, 1), PlacementConfig()), nodes, [0.0] * 8)
        for i in range(30)
    ]
    other = [
        picker.pick(
            RequestContext(PlacementRequest(f"r{i}", "m", 1, 1), PlacementConfig(seed=7)), nodes, [0.0] * 8
        )
        for i in range(30)
    ]
    assert first == again
    assert first != other
    assert len({n.worker_id for n in first}) > 3


def test_weighted_random_follows_scores() -> None:
    nodes = [node("zero"), node("low"), node("high")]
    picker = WeightedRandomPicker(WeightedRandomParams())
    counts = {"zero": 0, "low": 0, "high": 0}
    for i in range(600):
        c = RequestContext(PlacementRequest(f"r{i}", "m", 1, 1), PlacementConfig())
        counts[picker.pick(c, nodes, [0.0, 1.0, 3.0]).worker_id] += 1
    assert counts["zero"] == 0
    assert counts["high"] > 2 * counts["low"] > 0


def test_round_robin_cycles_in_worker_order() -> None:
    nodes = [node("c"), node("a"), node("b")]
    picker = RoundRobinPicker(RoundRobinParams())
    assert [picker.pick(ctx(), nodes, [0.0] * 3).worker_id for _ in range(4)] == ["a", "b", "c", "a"]


@pytest.mark.parametrize(
    ("factory", "params"),
    [
        (HealthFilter, HealthFilterParams(max_waiting=-1)),
        (PrefillBacklogFilter, PrefillBacklogParams(max_wait_s=-1.0)),
        (MaxScorePicker, MaxScoreParams(tie_epsilon=-1.0)),
        (WeightedRandomPicker, WeightedRandomParams(power=-1.0)),
    ],
)
def test_plugins_reject_bad_parameters(factory: type, params: msgspec.Struct) -> None:
    with pytest.raises(ValueError):
        factory(params)


def test_a_request_that_cannot_fit_a_node_has_no_room_there_whatever_its_choices() -> None:
    config = PlacementConfig(reservation=ReservationConfig(mode=ReservationMode.MAX_TOKENS))
    for followers in (0, 5):
        assert not ctx(config=config, followers=followers).has_room(node("small", blocks_total=13))
