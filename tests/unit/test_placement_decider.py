"""The deciders and the P/D profile handler: disaggregate or not, where, and the colocated fallbacks
(table-driven)."""

from __future__ import annotations

import msgspec
import pytest

from scheduler.placement.config import PlacementConfig, PluginSpec, ProfileConfig
from scheduler.placement.framework import Placer
from scheduler.placement.types import ClusterSnapshot, NodeView, PlacementRequest
from transport.errors import ErrorCode, PdorchError
from transport.messages import Role

KV = 320 * 1024  # bytes per token


def prefill(name: str = "p", queued: int = 0, rate: float = 10_000.0, **kw: object) -> NodeView:
    kw.setdefault("blocks_total", 100_000)
    return NodeView(
        name,
        Role.PREFILL,
        "m",
        queued_prefill_tokens=queued,
        prefill_tokens_per_s=rate,
        kv_bytes_per_token=KV,
        **kw,
    )  # type: ignore[arg-type]


def decode(name: str = "d", queued: int = 0, rate: float = 4_000.0, **kw: object) -> NodeView:
    kw.setdefault("blocks_total", 100_000)
    return NodeView(
        name,
        Role.DECODE,
        "m",
        queued_prefill_tokens=queued,
        prefill_tokens_per_s=rate,
        kv_bytes_per_token=KV,
        **kw,
    )  # type: ignore[arg-type]


def placer(type: str = "conditional", fallback_to_prefill_node: bool = False, **params: object) -> Placer:
    decode_profile = ProfileConfig(
        filters=(PluginSpec("role"), PluginSpec("health", params={"require_kv_room": True})),
        scorers=(PluginSpec("kv-occupancy"),),
    )
    prefill_profile = ProfileConfig(
        filters=(
            PluginSpec("role"),
            PluginSpec("health"),
            PluginSpec("prefill-backlog", params={"max_wait_s": 1.0}),
        ),
        scorers=(PluginSpec("prefill-delay"),),
    )
    config = PlacementConfig(
        handler=PluginSpec("pd"),
        prefill=prefill_profile,
        decode=decode_profile,
        decider=PluginSpec(type, params=params),
        fallback_to_prefill_node=fallback_to_prefill_node,
    )
    return Placer(config)


def req(
    prompt: int = 2000, hashes: tuple[int, ...] = (), quantiles: tuple = (), block: int = 0
) -> PlacementRequest:
    return PlacementRequest(
        "r",
        "m",
        prompt_len=prompt,
        max_tokens=500,
        block_hashes=hashes,
        prefix_block_tokens=block,
        predicted_output_quantiles=quantiles,
    )


CASES = [
    # (label, decider type and params, nodes, request, expected (prefill, decode))
    ("always: remote prefill", {"type": "always"}, [prefill(), decode()], req(), ("p", "d")),
    (
        "never: colocated on the decode pick",
        {"type": "never"},
        [prefill(), decode()],
        req(),
        ("d", "d"),
    ),
    (
        "threshold: few uncached tokens -> local",
        {"type": "threshold", "threshold_tokens": 512},
        [prefill(), decode(cached_block_hashes=frozenset({1, 2, 3}))],
        req(prompt=2000, hashes=(1, 2, 3, 4), block=512),
        ("d", "d"),
    ),
    (
        "threshold: many uncached tokens -> remote",
        {"type": "threshold", "threshold_tokens": 512},
        [prefill(), decode(cached_block_hashes=frozenset({1}))],
        req(prompt=2000, hashes=(1, 2, 3, 4), block=512),
        ("p", "d"),
    ),
    ("conditional: short prompt -> local", {}, [prefill(), decode()], req(prompt=200), ("d", "d")),
    # Remote: p idle at 10k tok/s = 0.2 s + 0.066 s transfer; local: 0.5 s x 1.5. Remote wins.
    ("conditional: idle prefill pool -> remote", {}, [prefill(), decode()], req(), ("p", "d")),
    # p has a 2 s backlog (20k tokens): local (0.75 s) < 0.8 x 2.27 s.
    ("conditional: busy prefill pool -> local", {}, [prefill(queued=9_000), decode()], req(), ("d", "d")),
    (
        "conditional: local cache hit beats an idle remote",
        {},
        # 7 of 8 blocks cached on d: 512 uncached tokens there (0.19 s) vs 4096 on p (0.46 s).
        [prefill(), decode(cached_block_hashes=frozenset(range(1, 8)))],
        req(prompt=4096, hashes=tuple(range(1, 9)), block=512),
        ("d", "d"),
    ),
    (
        "conditional: too long to prefill locally",
        {"local_max_uncached_tokens": 1000},
        [prefill(queued=9_000), decode()],
        req(),
        ("p", "d"),
    ),
    (
        "conditional: prefill pool all backlogged, decode node idle -> local",
        {"local_max_wait_s": 0.5},
        [prefill(queued=50_000), decode()],
        req(),
        ("d", "d"),
    ),
    (
        "conditional: short predicted answer after a long prompt stays on the prefill node",
        {
            "tpot_target_s": 0.1,
            "short_output_share": 0.2,
            "kv_link_gbytes_per_s": 100.0,
            "local_max_uncached_tokens": 0,
        },
        [prefill(), decode()],
        req(prompt=30_000, quantiles=((0.5, 3), (0.9, 40))),
        ("p", "p"),
    ),
    (
        "conditional: long predicted answer crosses the link",
        {
            "tpot_target_s": 0.1,
            "short_output_share": 0.2,
            "kv_link_gbytes_per_s": 100.0,
            "local_max_uncached_tokens": 0,
        },
        [prefill(), decode()],
        req(prompt=30_000, quantiles=((0.5, 300), (0.9, 900))),
        ("p", "d"),
    ),
    (
        "no decode room: fallback to a 'both' node",
        {},
        [prefill(), decode(blocks_total=10), NodeView("b", Role.BOTH, "m", blocks_total=100_000)],
        req(),
        ("b", "b"),
    ),
    (
        "no decode room: fallback to the prefill node when allowed",
        {"fallback_to_prefill_node": True},
        [prefill(), decode(blocks_total=10)],
        req(),
        ("p", "p"),
    ),
]


@pytest.mark.parametrize(
    ("label", "decider", "nodes", "placement_request", "expected"), CASES, ids=[c[0] for c in CASES]
)
def test_decider(
    label: str, decider: dict, nodes: list[NodeView], placement_request: PlacementRequest, expected: tuple
) -> None:
    placement = placer(**decider).place(ClusterSnapshot(tuple(nodes)), placement_request)
    assert (placement.prefill, placement.decode) == expected
    assert placement.colocated == (expected[0] == expected[1])
    # The reservation is on the node that decodes, sized by its block size (max_tokens: no prediction).
    assert placement.reserve_blocks > 0


@pytest.mark.parametrize(
    ("label", "decider", "nodes"),
    [
        ("no decode room, no fallback allowed", {}, [prefill(), decode(blocks_total=10)]),
        (
            "every prefill queue and the decode node backlogged",
            {"local_max_wait_s": 0.5},
            [prefill(queued=50_000), decode(queued=50_000)],
        ),
        ("always mode without any prefill node", {"type": "always"}, [decode()]),
    ],
)
def test_decider_answers_no_worker(label: str, decider: dict, nodes: list[NodeView]) -> None:
    with pytest.raises(PdorchError) as info:
        placer(**decider).place(ClusterSnapshot(tuple(nodes)), req())
    assert info.value.code is ErrorCode.NO_WORKER


def test_colocated_request_flag_forces_one_node() -> None:
    colocated = msgspec.structs.replace(req(), colocated=True)
    placement = placer().place(ClusterSnapshot((prefill(), decode())), colocated)
    assert placement.colocated


@pytest.mark.parametrize(
    ("decider", "fragment"),
    [
        ({"threshold_tokens": -1}, "threshold_tokens"),
        ({"local_slowdown": 0.5}, "local_slowdown"),
        ({"local_max_wait_s": -1.0}, "local_max_wait_s"),
        ({"short_output_quantile": 1.0}, "short_output_quantile"),
        ({"kv_link_gbytes_per_s": -1.0}, "kv_link_gbytes_per_s"),
    ],
)
def test_bad_decider_config(decider: dict, fragment: str) -> None:
    with pytest.raises(PdorchError) as info:
        placer(**decider)
    assert info.value.code is ErrorCode.CONFIG and fragment in info.value.message
