"""The placement framework: config errors, the filter -> score -> pick pipeline, latency, helpers."""

from __future__ import annotations

import msgspec
import pytest

from scheduler.placement.config import (
    PlacementConfig,
    PluginSpec,
    ProfileConfig,
    ReservationConfig,
    ReservationMode,
    load_placement_config,
)
from scheduler.placement.framework import Placer
from scheduler.placement.kv_budget import (
    blocks_for,
    outstanding_blocks,
    predicted_output_tokens,
    quantile_from,
    regrow,
)
from scheduler.placement.plugin import Decider, Filter, Picker, ProfileHandler, Scorer
from scheduler.placement.plugins.scorers.kv_occupancy_scorer import KvOccupancyParams, KvOccupancyScorer
from scheduler.placement.policies import policies, policy
from scheduler.placement.prefix import matched_prefix_blocks, prompt_block_hashes
from scheduler.placement.registry import PluginKind, default_registry
from scheduler.placement.types import ClusterSnapshot, NodeView, PlacementRequest
from transport.errors import ErrorCode, PdorchError
from transport.messages import Role


def cluster() -> ClusterSnapshot:
    return ClusterSnapshot(
        (
            NodeView(
                "p0",
                Role.PREFILL,
                "m",
                blocks_total=1000,
                queued_prefill_tokens=5000,
                prefill_tokens_per_s=1e4,
                prefill_wait_s=0.5,
            ),
            NodeView("p1", Role.PREFILL, "m", blocks_total=1000, prefill_tokens_per_s=1e4),
            NodeView("d0", Role.DECODE, "m", blocks_total=1000, blocks_used=900, prefill_tokens_per_s=5e3),
            NodeView("d1", Role.DECODE, "m", blocks_total=1000, blocks_used=100, prefill_tokens_per_s=5e3),
            NodeView("x", Role.DECODE, "other-model", blocks_total=1000),
        )
    )


def request(**kw: object) -> PlacementRequest:
    kw.setdefault("prompt_len", 2000)
    kw.setdefault("max_tokens", 100)
    return PlacementRequest(request_id="r", model="m", **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- config errors

CONFIG_ERRORS = [
    (
        {"decode": {"scorers": [{"type": "no-such-scorer"}]}},
        "placement.decode.scorers[0]: unknown scorer 'no-such-scorer'",
    ),
    (
        {"prefill": {"filters": [{"type": "role"}, {"type": "nope"}]}},
        "placement.prefill.filters[1]: unknown filter",
    ),
    ({"decode": {"scorers": [{"type": "role"}]}}, "'role' is a filter, not a scorer"),
    ({"decode": {"picker": {"type": "kv-occupancy"}}}, "placement.decode.picker: 'kv-occupancy' is a scorer"),
    ({"decode": {"scorers": [{"type": "queue", "weight": -1}]}}, "queue): weight must be >= 0"),
    ({"decode": {"scorers": [{"type": "queue", "weight": float("nan")}]}}, "weight must be >= 0"),
    ({"decode": {"filters": [{"type": "role", "weight": 2}]}}, "only scorers take a weight"),
    ({"decode": {"scorers": [{"type": "queue", "params": {"signal": "vibes"}}]}}, "(queue): bad parameter"),
    ({"decode": {"scorers": [{"type": "queue", "params": {"colour": 1}}]}}, "(queue): bad parameter"),
    (
        {"decode": {"picker": {"type": "weighted-random", "params": {"power": -2}}}},
        "(weighted-random): power",
    ),
    ({"decider": {"mode": "sometimes"}}, "placement:"),
    (
        {"accelerators": {"b200": {"tflops": -1, "hbm_gbytes_per_s": 8000, "memory_gb": 192}}},
        "Expected `float` > 0.0 - at `$.accelerators[...].tflops`",
    ),
    (
        {
            "accelerators": {
                "b200": {"tflops": 2250, "hbm_gbytes_per_s": 8000, "memory_gb": 192, "adapter_load_s": -0.1}
            }
        },
        "adapter_load_s",
    ),
    (
        {"accelerators": {"b200": {"tflops": float("nan"), "hbm_gbytes_per_s": 8000, "memory_gb": 192}}},
        "tflops",
    ),
    ({"decider": {"type": "sometimes"}}, "placement.decider: unknown decider 'sometimes'; known: always"),
    (
        {"decider": {"type": "conditional", "params": {"local_speedup": 0}}},
        "placement.decider (conditional): local_speedup must be > 0",
    ),
    # Each decider has its own parameters: the threshold decider has no local_speedup.
    (
        {"decider": {"type": "threshold", "params": {"local_speedup": 1}}},
        "placement.decider (threshold): bad parameter: Object contains unknown field `local_speedup`",
    ),
    ({"decider": {"type": "max-score"}}, "placement.decider: 'max-score' is a picker, not a decider"),
    ({"decider": {"type": "never", "weight": 2}}, "placement.decider (never): only scorers take a weight"),
    ({"handler": {"type": "joint"}}, "placement.handler: unknown handler 'joint'; known: pd, slo"),
    (
        {"handler": {"type": "slo", "params": {"headroom": 0.2}}},
        "placement.handler (slo): bad parameter: Object contains unknown field `headroom`",
    ),
    ({"handler": {"type": "conditional"}}, "placement.handler: 'conditional' is a decider, not a handler"),
    ({"reservation": {"output_quantile": 1.5}}, "output_quantile must be in (0, 1)"),
    ({"decoder": {}}, "placement:"),
]


@pytest.mark.parametrize(("raw", "fragment"), CONFIG_ERRORS)
def test_bad_config_names_the_entry(raw: dict, fragment: str) -> None:
    with pytest.raises(PdorchError) as info:
        Placer(raw)
    assert info.value.code is ErrorCode.CONFIG
    assert fragment in info.value.message


def test_config_from_plain_data_round_trips() -> None:
    raw = {
        "decode": {
            "filters": [{"type": "role"}, {"type": "health", "params": {"require_kv_room": True}}],
            "scorers": [{"type": "kv-occupancy", "weight": 3}],
            "picker": {"type": "max-score"},
        },
        "reservation": {"mode": "max_tokens"},
        "seed": 4,
    }
    config = load_placement_config(raw)
    assert config.decode.scorers[0].weight == 3
    assert config.reservation.mode is ReservationMode.MAX_TOKENS
    assert Placer(config).config.seed == 4


def test_every_registered_plugin_implements_its_kind() -> None:
    registry = default_registry()
    kinds = [
        (PluginKind.FILTER, registry.build_filter, Filter),
        (PluginKind.SCORER, registry.build_scorer, Scorer),
        (PluginKind.PICKER, registry.build_picker, Picker),
        (PluginKind.DECIDER, registry.build_decider, Decider),
        (PluginKind.HANDLER, registry.build_handler, ProfileHandler),
    ]
    for kind, build, protocol in kinds:
        assert registry.names(kind)
        for name in registry.names(kind):
            assert isinstance(build(PluginSpec(name), "test"), protocol), name


def test_a_plugin_name_is_registered_once_across_kinds() -> None:
    registry = default_registry()
    with pytest.raises(PdorchError) as info:
        registry.register_scorer("role", KvOccupancyParams, KvOccupancyScorer)
    assert "registered twice" in info.value.message


def test_every_named_policy_builds() -> None:
    for name in policies():
        Placer(policy(name))
    with pytest.raises(PdorchError) as info:
        policy("telepathy")
    assert info.value.code is ErrorCode.CONFIG


@pytest.mark.parametrize(
    ("config", "roles"),
    [
        (PlacementConfig(), {Role.BOTH, Role.PREFILL, Role.DECODE}),
        (PlacementConfig(fallback_to_prefill_node=False), {Role.BOTH, Role.DECODE}),
        (
            PlacementConfig(
                handler=PluginSpec("slo", params={"colocate": False}), fallback_to_prefill_node=False
            ),
            {Role.BOTH},
        ),
        (PlacementConfig(handler=PluginSpec("pd")), {Role.BOTH, Role.PREFILL, Role.DECODE}),
        (PlacementConfig(handler=PluginSpec("pd"), decider=PluginSpec("always")), {Role.BOTH, Role.PREFILL}),
    ],
)
def test_the_roles_a_request_may_run_on_whole(config: PlacementConfig, roles: set[Role]) -> None:
    """What admission and /ready accept as enough workers, besides a prefill and a decode one."""
    assert Placer(config).whole_request_roles == roles
    # And the placer does run a request whole there, alone.
    for role in (Role.PREFILL, Role.DECODE):
        alone = ClusterSnapshot((NodeView("n", role, "m", blocks_total=1000),))
        if role in roles:
            placement = Placer(config).place(alone, request())
            assert (placement.prefill, placement.decode) == ("n", "n")
        else:
            with pytest.raises(PdorchError) as info:
                Placer(config).place(alone, request())
            assert info.value.code is ErrorCode.NO_WORKER


# --------------------------------------------------------------------------- the pipeline


def test_default_placer_picks_idle_prefill_and_roomy_decode() -> None:
    placement = Placer().place(cluster(), request())
    assert (placement.prefill, placement.decode) == ("p1", "d1")
    # prompt 2000 + max_tokens 100 (no prediction) = 2100 tokens = 132 blocks of 16.
    assert placement.reserve_blocks == 132


def test_the_pd_handler_hands_over_from_another_prefill_node_while_a_kv_path_backs_off() -> None:
    placer = Placer(PlacementConfig(handler=PluginSpec("pd"), decider=PluginSpec("always")))
    nodes = list(cluster().nodes)
    assert placer.place(ClusterSnapshot(tuple(nodes)), request()).prefill == "p1"
    # Handoffs from p1 (the prefill profile's pick) to d1 (the decode pick) lately did not land.
    nodes[3] = msgspec.structs.replace(nodes[3], kv_unreachable_from=frozenset({"p1"}))
    assert (placer.place(ClusterSnapshot(tuple(nodes)), request()).prefill, "d1") == ("p0", "d1")
    # And p0's own KV network is down too: nothing else is left, so the pair is tried (the probe).
    nodes[0] = msgspec.structs.replace(nodes[0], kv_unreachable=True)
    assert placer.place(ClusterSnapshot(tuple(nodes)), request()).prefill == "p1"


def test_weights_come_from_the_profile() -> None:
    # Two scorers that disagree: whichever has the larger weight decides.
    def placer(kv_weight: float, active_weight: float) -> Placer:
        decode = ProfileConfig(
            scorers=(
                PluginSpec("kv-occupancy", weight=kv_weight),
                PluginSpec("active-requests", weight=active_weight),
            )
        )
        return Placer(PlacementConfig(handler=PluginSpec("pd"), decode=decode, decider=PluginSpec("always")))

    snap = ClusterSnapshot(
        (
            NodeView("p", Role.PREFILL, "m", blocks_total=10),
            NodeView("roomy-busy", Role.DECODE, "m", blocks_total=1000, inflight=9),
            NodeView("full-idle", Role.DECODE, "m", blocks_total=1000, blocks_used=800),
        )
    )
    assert placer(1.0, 0.1).place(snap, request()).decode == "roomy-busy"
    assert placer(0.1, 1.0).place(snap, request()).decode == "full-idle"


def test_no_worker_for_unknown_model_or_no_room() -> None:
    with pytest.raises(PdorchError) as info:
        Placer().place(cluster(), PlacementRequest("r", "absent", 10, 10))
    assert info.value.code is ErrorCode.NO_WORKER
    full = ClusterSnapshot(
        (
            NodeView("p", Role.PREFILL, "m", blocks_total=10, blocks_used=10),
            NodeView("d", Role.DECODE, "m", blocks_total=100, blocks_used=99),
        )
    )
    with pytest.raises(PdorchError) as info:
        Placer().place(full, request())
    assert info.value.code is ErrorCode.NO_WORKER


def test_placement_is_deterministic_without_a_clock() -> None:
    snap, req = cluster(), request(block_hashes=(1, 2, 3))
    for name in policies():
        first = [Placer(policy(name)).place(snap, req) for _ in range(3)]
        assert first[0] == first[1] == first[2], name


def test_latency_is_recorded_per_plugin_with_the_injected_clock() -> None:
    ticks = iter(range(10_000))

    def fake_clock() -> float:
        return float(next(ticks))

    placer = Placer(policy("pdorch-pd"), clock=fake_clock)
    for _ in range(3):
        placer.place(cluster(), request())
    stats = placer.latency()
    assert stats["decode/filter/role"].calls == 3
    assert stats["prefill/scorer/prefill-delay"].calls == 3
    # Each plugin call spans exactly one tick of the fake clock.
    assert all(s.total_s == s.calls and s.max_s == 1.0 for s in stats.values())
    assert Placer().latency() == {}


# --------------------------------------------------------------------------- KV budget and prefix hashes


@pytest.mark.parametrize(
    ("mode", "quantiles", "predicted", "max_tokens", "expected"),
    [
        (ReservationMode.PREDICTED, ((0.5, 40), (0.9, 200)), 0, 1000, 200),
        (ReservationMode.PREDICTED, ((0.5, 40), (0.9, 200)), 0, 100, 100),  # capped by max_tokens
        (ReservationMode.PREDICTED, (), 70, 1000, 70),  # point prediction
        (ReservationMode.PREDICTED, (), 0, 300, 300),  # nothing: max_tokens
        (ReservationMode.PREDICTED, ((0.5, 2), (0.9, 4)), 0, 1000, 16),  # floor
        (ReservationMode.MAX_TOKENS, ((0.9, 5),), 0, 300, 300),
        (ReservationMode.PROMPT, ((0.9, 5),), 0, 300, 0),
    ],
)
def test_predicted_output_tokens(
    mode: ReservationMode, quantiles: tuple, predicted: int, max_tokens: int, expected: int
) -> None:
    req = request(max_tokens=max_tokens, predicted_output_quantiles=quantiles, predicted_output_len=predicted)
    assert predicted_output_tokens(req, ReservationConfig(mode=mode, output_quantile=0.9)) == expected


@pytest.mark.parametrize(("level", "expected"), [(0.1, 10), (0.5, 10), (0.7, 55), (0.9, 100), (0.99, 100)])
def test_quantile_interpolation(level: float, expected: int) -> None:
    assert quantile_from(((0.5, 10), (0.9, 100)), level) == expected


@pytest.mark.parametrize(
    ("reserved", "tokens", "max_total", "expected"),
    [
        (10, 100, 0, 10),  # 100 tokens = 7 blocks < 10 reserved: unchanged
        (7, 112, 0, 11),  # exactly full (7 blocks): grows to 112 * 1.5 = 168 tokens = 11 blocks
        (7, 112, 120, 8),  # ... but not past prompt + max_tokens (120 tokens = 8 blocks)
        (2, 1, 0, 2),  # never shrinks
        (1, 16, 16, 1),  # at the cap already: stays
    ],
)
def test_regrow(reserved: int, tokens: int, max_total: int, expected: int) -> None:
    assert regrow(reserved, tokens, 16, max_total_tokens=max_total, factor=0.5) == expected


def test_outstanding_and_blocks() -> None:
    assert blocks_for(0, 16) == 0 and blocks_for(1, 16) == 1 and blocks_for(33, 16) == 3
    assert outstanding_blocks(10, 33, 16) == 7
    assert outstanding_blocks(2, 100, 16) == 0


def test_prompt_block_hashes_are_chained_and_stable() -> None:
    a = prompt_block_hashes(list(range(40)), 16)
    assert len(a) == 2  # the partial third block gets no hash
    # Same prefix, same hashes; a change in block 0 changes every later hash (chained).
    assert prompt_block_hashes(list(range(32)) + [999] * 8, 16) == a
    changed = prompt_block_hashes([7, *range(1, 40)], 16)
    assert changed[0] != a[0] and changed[1] != a[1]
    # Stable across processes, runs and machines: a fixed, known value (BLAKE2b of little-endian int64s).
    assert prompt_block_hashes([1, 2, 3, 4], 4) == (7597657864365363701,)
    assert all(0 <= h < 2**63 for h in a)
    assert matched_prefix_blocks(a, {a[0]}) == 1
    assert matched_prefix_blocks(a, {a[1]}) == 0


def test_prompt_block_hashes_match_a_fresh_interpreter() -> None:
    import subprocess
    import sys

    code = "from scheduler.placement.prefix import prompt_block_hashes as h; print(h(list(range(64)), 16))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == str(prompt_block_hashes(list(range(64)), 16))
