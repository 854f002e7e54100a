"""The SLO profile handler's joint choice, table-driven: where the candidate best for one objective
breaks another (TPOT, its own or of requests already decoding), it must not be taken.

Latency models are fixed here (as if learnt), so every prediction can be checked by hand:

* prefill: H100 0.1 s, A100 0.25 s per 1k uncached tokens;
* decode step: H100 30 ms + 30 ms per 100 requests, A100 40 ms + 50 ms per 100 requests, and a
  prompt prefilled on the node stalls its decoding requests 1 s per 1k tokens;
* handoff: 10 ms per GB (KV of 320 KiB per token: 6.6 ms for 2,000 tokens).

The request: 2,000 tokens; its predicted output has median 101 tokens (100 decode steps) and 0.1
quantile 21 (20 steps: the handoff is judged over those); TTFT objective 2 s, TPOT 100 ms.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest

from scheduler.placement.config import PlacementConfig, PluginSpec, ProfileConfig
from scheduler.placement.framework import Placer
from scheduler.placement.latency_model import (
    ClassLatency,
    LatencyTable,
    LinearModel,
    class_key,
    link_key,
    scaled,
)
from scheduler.placement.types import ClusterSnapshot, NodeView, PlacementRequest
from transport.errors import ErrorCode, PdorchError
from transport.messages import Role

M = "m"
KV = 320 * 1024
TABLE = LatencyTable(
    classes={
        class_key(M, "h100"): ClassLatency(
            LinearModel((0.0, 0.1, 0.0, 0.0, 0.0, 0.0)), LinearModel((0.03, 0.03, 0.0, 1.0))
        ),
        class_key(M, "a100"): ClassLatency(
            LinearModel((0.0, 0.25, 0.0, 0.0, 0.0, 0.0)), LinearModel((0.04, 0.05, 0.0, 1.0))
        ),
    },
    handoffs={link_key(M, "h100", "a100"): LinearModel((0.0, 0.01))},
)


def p(name: str = "p", **kw: Any) -> NodeView:
    kw = {"accelerator": "h100", "blocks_total": 100_000, "kv_bytes_per_token": KV, **kw}
    return NodeView(name, Role.PREFILL, M, **kw)


def d(name: str = "d", **kw: Any) -> NodeView:
    kw = {"accelerator": "a100", "blocks_total": 100_000, "kv_bytes_per_token": KV, **kw}
    return NodeView(name, Role.DECODE, M, **kw)


def members(tolerance_s: float, steps: int = 50) -> dict[str, Any]:
    """A node whose tightest decoding request can absorb ``tolerance_s`` more over ``steps`` steps."""
    return {"stall_tolerance_s": tolerance_s, "tolerance_steps": steps, "tolerance_tpot_s": 0.1}


def request(**kw: Any) -> PlacementRequest:
    base: dict[str, Any] = {
        "prompt_len": 2000,
        "max_tokens": 1000,
        "predicted_output_quantiles": ((0.1, 21), (0.5, 101), (0.9, 300)),
        "ttft_slo_s": 2.0,
        "tpot_slo_s": 0.1,
    }
    return PlacementRequest("r", M, **{**base, **kw})


def placer(**handler: Any) -> Placer:
    fallback = handler.pop("fallback", True)
    handler.setdefault("max_prefill_wait_s", 0.0)  # late binding off unless a case is about it
    return Placer(
        PlacementConfig(
            handler=PluginSpec("slo", params=handler),
            decode=ProfileConfig(
                filters=(PluginSpec("role"), PluginSpec("health", params={"require_kv_room": True}))
            ),
            prefill=ProfileConfig(),
            fallback_to_prefill_node=fallback,
        )
    )


CASES: list[tuple[str, list[NodeView], dict[str, Any], dict[str, Any], tuple[str, str] | ErrorCode]] = [
    (
        "idle cluster: split, on the prefill node and the decode node",
        [p(), d()],
        {},
        {},
        ("p", "d"),
    ),
    (
        "the prefill node with the best TTFT is decoding requests its prefill would stall past their "
        "TPOT: the queued one",
        [p("fast", decode_batch=4, **members(0.1)), p("queued", prefill_wait_s=1.0), d()],
        {},
        {},
        ("queued", "d"),
    ),
    (
        "the only prefill node decodes requests lent to it that its prefill would stall past their "
        "TPOT, and no decode node can prefill: prefill there anyway (on a prefill node prefills "
        "come first; waiting for those requests to end would hold up every prompt)",
        [p(decode_batch=4, **members(0.01)), d(decode_batch=10, **members(0.3))],
        {},
        {},
        ("p", "d"),
    ),
    (
        "the decode node whose batch would slow every step past the TPOT objective is not taken",
        [p(), d("crowded", decode_batch=150, decode_context_tokens=300_000), d("light", decode_batch=20)],
        {},
        {},
        ("p", "light"),
    ),
    (
        "adding the request to a batch would push its tightest member past its TPOT: the other node",
        [p(), d("tight", decode_batch=40, **members(0.2, steps=100)), d("loose", decode_batch=40)],
        {},
        {},
        ("p", "loose"),
    ),
    (
        "prefilling on the idle decode node has the best TTFT, but split meets both objectives: split",
        [p(prefill_wait_s=1.0), d()],
        {},
        {},
        ("p", "d"),
    ),
    (
        "split misses TTFT; a decode node's local prefill meets it but stalls its decoding requests "
        "past their TPOT: the other decode node prefills",
        [p(prefill_wait_s=3.0), d("busy", decode_batch=10, **members(0.3)), d("free")],
        {},
        {},
        ("free", "free"),
    ),
    (
        "every candidate that meets TTFT breaks someone's TPOT, and TTFT can still be met: wait",
        [p(prefill_wait_s=3.0, decode_batch=5, **members(0.1)), d("a", decode_batch=10, **members(0.3))],
        {},
        {},
        ErrorCode.NO_WORKER,
    ),
    (
        "long prompt, short answer: the KV handoff alone breaks its TPOT, the prefill node serves it all",
        [p(), d()],
        {
            "prompt_len": 60_000,
            "ttft_slo_s": 10.0,
            "predicted_output_quantiles": ((0.1, 3), (0.5, 5), (0.9, 9)),
        },
        {},
        ("p", "p"),
    ),
    (
        "the same, but the prefill node has a prompt queued: it is not lent to decoding while "
        "prompts wait there (its decoding would slow them all); the request waits",
        [p(prefill_wait_s=0.2), d()],
        {
            "prompt_len": 60_000,
            "ttft_slo_s": 10.0,
            "predicted_output_quantiles": ((0.1, 3), (0.5, 5), (0.9, 9)),
        },
        {},
        ErrorCode.NO_WORKER,
    ),
    (
        "the same without prefill nodes decoding: no candidate could meet both even on an idle "
        "cluster: served anyway, split",
        [p(), d()],
        {
            "prompt_len": 60_000,
            "ttft_slo_s": 10.0,
            "predicted_output_quantiles": ((0.1, 3), (0.5, 5), (0.9, 9)),
        },
        {"fallback": False},
        ("p", "d"),
    ),
    (
        "TTFT cannot be met anywhere any more: shed",
        [p(prefill_wait_s=5.0), d(prefill_wait_s=4.0)],
        {},
        {},
        ErrorCode.QUEUE_FULL,
    ),
    (
        "the same with shedding off: served late, split (no node lent to the other phase for it)",
        [p(prefill_wait_s=5.0), d(prefill_wait_s=4.0)],
        {},
        {"shed": False},
        ("p", "d"),
    ),
    (
        "objectives no idle cluster could meet: served anyway, split",
        [p(), d()],
        {"ttft_slo_s": 0.05},
        {},
        ("p", "d"),
    ),
    (
        "a request that moves after a worker failure (best effort) is placed even when it will miss",
        [p(prefill_wait_s=3.0, decode_batch=5, **members(0.1)), d("a", decode_batch=10, **members(0.3))],
        {"best_effort": True},
        {},
        ("p", "a"),
    ),
    (
        "no objectives: the split pair predicted fastest",
        [p("slow", prefill_wait_s=0.5), p("quick"), d()],
        {"ttft_slo_s": 0.0, "tpot_slo_s": 0.0},
        {},
        ("quick", "d"),
    ),
    (
        "no decode node has room and the request has waited past its TTFT objective: shed",
        [p(blocks_total=0), d(blocks_used=100_000)],
        {"waited_s": 2.5},
        {},
        ErrorCode.QUEUE_FULL,
    ),
    (
        "no decode node has room yet: wait",
        [p(blocks_total=0), d(blocks_used=100_000)],
        {"waited_s": 0.5},
        {},
        ErrorCode.NO_WORKER,
    ),
    (
        "a decode node that keeps prefilling (500 tokens/s at 1 s per 1k: half its time) decodes at "
        "half speed, past the TPOT objective at batch 40: the other one",
        [p(), d("prefilling", decode_batch=40, prefilling_tokens_per_s=500.0), d("calm", decode_batch=40)],
        {},
        {},
        ("p", "calm"),
    ),
    (
        "the only decode node prefills all the time (no step ever ends), but idle it would meet the "
        "objectives: wait for it, not served late",
        [p(), d(prefilling_tokens_per_s=2000.0)],
        {},
        {"fallback": False, "colocate": False},
        ErrorCode.NO_WORKER,
    ),
    (
        "late binding: the prefill node has more queued than the bound, the idle decode node prefills",
        [p(prefill_wait_s=1.0), d()],
        {},
        {"max_prefill_wait_s": 0.5},
        ("d", "d"),
    ),
    (
        "late binding: every prefill queue is over the bound and TTFT can still be met: wait",
        [p(prefill_wait_s=1.0), d()],
        {},
        {"max_prefill_wait_s": 0.5, "colocate": False},
        ErrorCode.NO_WORKER,
    ),
    (
        "no decode node has room; the prefill node with room for the KV decodes already and has a "
        "prompt queued (so it may not take the request whole), the idle one has no room to keep it: "
        "prefilled on the idle one, its KV handed to the other, which only decodes it",
        [
            p("lent", prefill_wait_s=0.2, decode_batch=3, takes_handoff=True),
            p("short", blocks_total=100),
            d(blocks_used=100_000),
        ],
        {},
        {},
        ("short", "lent"),
    ),
    (
        "the same, but the node with room decodes nothing yet: lent all the same, its queue being "
        "within the late-binding bound (chunking it costs little)",
        [
            p("lent", prefill_wait_s=0.2, takes_handoff=True),
            p("short", blocks_total=100),
            d(blocks_used=100_000),
        ],
        {},
        {"max_prefill_wait_s": 0.5},
        ("short", "lent"),
    ),
    (
        "the same with more queued there than the bound: lending it would chunk all of it; wait",
        [
            p("lent", prefill_wait_s=1.0, takes_handoff=True),
            p("short", blocks_total=100),
            d(blocks_used=100_000),
        ],
        {},
        {"max_prefill_wait_s": 0.5},
        ErrorCode.NO_WORKER,
    ),
    (
        "the same, but the node with room cannot take a handoff (no KV endpoint): wait",
        [p("lent", prefill_wait_s=0.2, decode_batch=3), p("short", blocks_total=100), d(blocks_used=100_000)],
        {},
        {},
        ErrorCode.NO_WORKER,
    ),
    (
        "no decode node has room; one prefill node already decodes, the other is idle and would leave "
        "more headroom: the one already lent (lending a second would chunk its prefills too)",
        [p("a", decode_batch=5, takes_handoff=True), p("b", takes_handoff=True), d(blocks_used=100_000)],
        {},
        {},
        ("a", "a"),
    ),
    (
        "late binding: a prefill queue within the bound is taken",
        [p(prefill_wait_s=0.4), d()],
        {},
        {"max_prefill_wait_s": 0.5},
        ("p", "d"),
    ),
    (
        "handoffs from the best prefill node to the decode node lately did not land: the next best "
        "prefill node of its class hands over",
        [p("best"), p("next", prefill_wait_s=0.5), d(kv_unreachable_from=frozenset({"best"}))],
        {},
        {},
        ("next", "d"),
    ),
    (
        "the best prefill node's KV network is taken as down: no split from it",
        [p("cut", kv_unreachable=True), p("next", prefill_wait_s=0.5), d()],
        {},
        {},
        ("next", "d"),
    ),
    (
        "the only pair's KV path backs off: the decode node prefills the request itself",
        [p(), d(kv_unreachable_from=frozenset({"p"}))],
        {},
        {},
        ("d", "d"),
    ),
    (
        "the only pair's KV path backs off, no other way: the pair is tried (its handoff is the probe)",
        [p(), d(kv_unreachable_from=frozenset({"p"}))],
        {},
        {"fallback": False, "colocate": False},
        ("p", "d"),
    ),
    (
        "a prefill node lent to decoding takes no handoff over a KV path that backs off",
        [p("host", kv_unreachable_from=frozenset({"other"})), p("other", prefill_wait_s=0.5)],
        {},
        {},
        ("host", "host"),
    ),
]


@pytest.mark.parametrize(
    ("nodes", "req", "params", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_joint_choice(
    nodes: list[NodeView], req: dict[str, Any], params: dict[str, Any], expected: tuple[str, str] | ErrorCode
) -> None:
    snapshot = ClusterSnapshot(tuple(nodes), TABLE)
    if isinstance(expected, ErrorCode):
        with pytest.raises(PdorchError) as info:
            placer(**params).place(snapshot, request(**req))
        assert info.value.code is expected
        return
    placement = placer(**params).place(snapshot, request(**req))
    assert (placement.prefill, placement.decode) == expected


def test_whether_a_request_can_wait_is_judged_on_the_class_not_on_its_first_node() -> None:
    # The first A100 is a straggler (its decode steps 10x the class's: 405 ms at batch 1, never
    # within 100 ms), the other prefills all the time. Neither meets the objectives now; the typical
    # A100, idle, would: wait for it rather than be served late on either.
    slow = scaled(TABLE.classes[class_key(M, "a100")], 1.0, 10.0)
    table = msgspec.structs.replace(TABLE, nodes={"slow": slow})
    nodes = (p(), d("slow"), d("busy", prefilling_tokens_per_s=2000.0))
    with pytest.raises(PdorchError) as info:
        placer(fallback=False, colocate=False).place(ClusterSnapshot(nodes, table), request())
    assert info.value.code is ErrorCode.NO_WORKER
    assert "waiting" in info.value.message
    # The class itself that slow (what the learner makes of a class whose nodes are all slow):
    # nothing would ever meet the objectives, so it is served late.
    classes = {**TABLE.classes, class_key(M, "a100"): table.nodes["slow"]}
    everyone = msgspec.structs.replace(TABLE, classes=classes)
    placement = placer(fallback=False, colocate=False).place(ClusterSnapshot(nodes, everyone), request())
    assert placement.prefill == "p"


def test_the_placement_carries_its_predictions() -> None:
    placement = placer().place(ClusterSnapshot((p(prefill_wait_s=0.4), d()), TABLE), request())
    # TTFT: 0.4 s queued + 2,000 tokens at 0.1 s per 1k. TPOT at the median output: A100 step with one
    # request (40 ms + 0.5 ms) + the 6.6 ms handoff over its 100 steps.
    assert placement.predicted_ttft_s == pytest.approx(0.6)
    handoff = 2000 * KV / 1e9 * 0.01
    assert placement.predicted_tpot_s == pytest.approx(0.0405 + handoff / 100)


def test_the_request_has_waited_so_its_ttft_is_shorter_by_that_much() -> None:
    snap = ClusterSnapshot((p(prefill_wait_s=1.0), d()), TABLE)
    assert placer().place(snap, request(waited_s=0.7)).prefill == "p"  # 0.7 + 1.0 + 0.2 <= 2
    with pytest.raises(PdorchError) as info:
        placer(colocate=False).place(snap, request(waited_s=0.9))  # 2.1 > 2: nowhere else to go
    assert info.value.code is ErrorCode.QUEUE_FULL


def test_ties_go_to_the_profiles_scorers() -> None:
    config = msgspec.structs.replace(
        placer().config,
        decode=ProfileConfig(
            filters=(PluginSpec("role"), PluginSpec("health", params={"require_kv_room": True})),
            scorers=(PluginSpec("kv-occupancy"),),
        ),
    )
    nodes = (p(), d("fuller", blocks_used=50_000), d("emptier", blocks_used=10_000))
    placement = Placer(config).place(ClusterSnapshot(nodes, TABLE), request(ttft_slo_s=0.0, tpot_slo_s=0.0))
    assert placement.decode == "emptier"


def test_by_default_ties_go_to_the_decode_node_with_fewer_requests() -> None:
    # Predicted alike (a step's cost here does not depend on what the scheduler has in flight), so
    # the default's scorer decides, whatever the seeded draw would say for each request.
    nodes = (p(), d("busy", inflight=12), d("idle", inflight=2))
    for i in range(20):
        req = msgspec.structs.replace(request(ttft_slo_s=0.0, tpot_slo_s=0.0), request_id=f"r{i}")
        placement = Placer(PlacementConfig()).place(ClusterSnapshot(nodes, TABLE), req)
        assert placement.decode == "idle"


def test_an_unlearnt_class_uses_the_prior() -> None:
    nodes = (p(accelerator="l40s"), d(accelerator="l40s"))
    placement = placer().place(ClusterSnapshot(nodes), request())
    assert (
        placement.prefill == "p"
        and math.isfinite(placement.predicted_ttft_s)
        and placement.predicted_ttft_s > 0
    )


def test_a_learnt_tpot_margin_keeps_a_batch_off_the_edge() -> None:
    """The A100 with 100 requests decoding meets the TPOT objective by prediction (91 ms), so the
    request is split onto it. Where that class's requests have been missing their TPOT, the learnt
    margin (20%: 80 ms) rules it out, and the idle prefill node decodes the request itself."""
    nodes = (p(), d(decode_batch=100))
    placement = placer().place(ClusterSnapshot(nodes, TABLE), request())
    assert (placement.prefill, placement.decode) == ("p", "d")
    margined = msgspec.structs.replace(TABLE, tpot_margin={class_key(M, "a100"): 0.2}, version=1)
    placement = placer().place(ClusterSnapshot(nodes, margined), request())
    assert (placement.prefill, placement.decode) == ("p", "p")
