"""Named placement policies: pdorch's default and the baselines it is measured against.

Each is a :class:`PlacementConfig` in the same framework, so the simulator compares policies, not
implementations. ``colocated`` also needs a cluster of "both" nodes (the simulator converts it).
"""

from __future__ import annotations

from collections.abc import Callable

from scheduler.placement.config import (
    PlacementConfig,
    PluginSpec,
    ProfileConfig,
    ReservationConfig,
    ReservationMode,
)
from transport.errors import ErrorCode, PdorchError

_PLAIN = (PluginSpec("role"), PluginSpec("health"))
_PROMPT_ONLY = ReservationConfig(mode=ReservationMode.PROMPT)
_ALWAYS = PluginSpec("always")
# The baselines run the llm-d way: the decode profile's pick, then a decider.
_PD = PluginSpec("pd")
# The decider of colocated serving: every node does both prefill and decode.
_NEVER = PluginSpec("never")


def _both(profile: ProfileConfig, decider: PluginSpec = _ALWAYS) -> PlacementConfig:
    # As the peers do: a prefill node never decodes.
    return PlacementConfig(
        handler=_PD,
        prefill=profile,
        decode=profile,
        decider=decider,
        reservation=_PROMPT_ONLY,
        fallback_to_prefill_node=False,
    )


def pdorch(tpot_target_s: float = 0.0, kv_link_gbytes_per_s: float = 25.0) -> PlacementConfig:
    """The default: the SLO handler chooses the (prefill, decode) pair, or one node for both, with the
    most headroom on the request's predicted TTFT and TPOT and those of the requests already decoding,
    from latency models learnt online; it queues what cannot meet its objectives yet and sheds what
    never will. The profiles only filter: roles, draining nodes, KV room for the reservation.

    It is the config's defaults, so the live scheduler runs what the simulator measures. The
    arguments are accepted for symmetry with :func:`pdorch_pd` and ignored: the objectives come
    with each request and the handoff's cost is learnt.
    """
    return PlacementConfig()


def pdorch_pd(tpot_target_s: float = 0.0, kv_link_gbytes_per_s: float = 25.0) -> PlacementConfig:
    """pdorch's previous policy, kept for comparison: KV-reserving, cache-aware decode choice;
    delay-estimating prefill with late binding; the conditional decider (weights and thresholds
    chosen by hand on the Azure code and Mooncake traces).

    ``tpot_target_s`` and ``kv_link_gbytes_per_s`` describe the deployment (its TPOT objective and
    the KV link speed); the decider uses them to weigh a KV handoff against staying colocated.
    """
    return PlacementConfig(
        handler=_PD,
        decode=ProfileConfig(
            filters=(PluginSpec("role"), PluginSpec("health", params={"require_kv_room": True})),
            scorers=(
                PluginSpec("kv-occupancy", weight=2.0),
                PluginSpec("active-requests", weight=1.0),
                # The decode node may prefill the request itself (conditional disaggregation), and it
                # caches the prompts it decodes: placing by prefix keeps that cache useful.
                PluginSpec("prefix-affinity", weight=2.0),
                PluginSpec("prefill-delay", weight=2.0),
                PluginSpec("accelerator", weight=0.5),
            ),
        ),
        prefill=ProfileConfig(
            # Late binding: a request waits in admission (most urgent first) rather than join a
            # prefill queue holding more than 0.1 s of work; it then goes where room appears first.
            filters=(*_PLAIN, PluginSpec("prefill-backlog", params={"max_wait_s": 0.1})),
            scorers=(
                PluginSpec("prefill-delay", weight=1.0),
                # Affinity on top of the delay estimate keeps each prefix on few nodes, so the
                # caches hold more distinct prefixes between them.
                PluginSpec("prefix-affinity", weight=1.0),
                PluginSpec("accelerator", weight=0.1),
            ),
        ),
        decider=PluginSpec(
            "conditional",
            params={
                "local_max_uncached_tokens": 65536,
                "local_max_wait_s": 0.1,
                "tpot_target_s": tpot_target_s,
                "short_output_share": 0.2,
                "kv_link_gbytes_per_s": kv_link_gbytes_per_s,
            },
        ),
        reservation=ReservationConfig(mode=ReservationMode.PREDICTED, output_quantile=0.9),
    )


def round_robin(**_: float) -> PlacementConfig:
    return _both(ProfileConfig(filters=_PLAIN, picker=PluginSpec("round-robin")))


def random_choice(**_: float) -> PlacementConfig:
    return _both(ProfileConfig(filters=_PLAIN, picker=PluginSpec("random")))


def least_request(**_: float) -> PlacementConfig:
    return _both(ProfileConfig(filters=_PLAIN, scorers=(PluginSpec("active-requests"),)))


def least_kv(**_: float) -> PlacementConfig:
    """AIBrix's least-kv-cache: the node with the lowest reported KV usage."""
    scorer = PluginSpec("kv-occupancy", params={"include_reserved": False})
    return _both(ProfileConfig(filters=_PLAIN, scorers=(scorer,)))


def prefix_queue(**_: float) -> PlacementConfig:
    """llm-d's P/D profile: prefix-cache scorer (weight 2) + queue scorer (weight 1), max-score picker."""
    scorers = (PluginSpec("prefix-affinity", weight=2.0), PluginSpec("queue", weight=1.0))
    return _both(ProfileConfig(filters=_PLAIN, scorers=scorers))


def colocated(**_: float) -> PlacementConfig:
    """No disaggregation: prefix + queue scoring over "both" nodes; each request stays on one node."""
    scorers = (PluginSpec("prefix-affinity", weight=2.0), PluginSpec("queue", weight=1.0))
    return _both(ProfileConfig(filters=_PLAIN, scorers=scorers), _NEVER)


def policies() -> dict[str, Callable[..., PlacementConfig]]:
    return {
        "pdorch": pdorch,
        "pdorch-pd": pdorch_pd,
        "round-robin": round_robin,
        "random": random_choice,
        "least-request": least_request,
        "least-kv": least_kv,
        "prefix-queue": prefix_queue,
        "colocated": colocated,
    }


def policy(name: str, *, tpot_target_s: float = 0.0, kv_link_gbytes_per_s: float = 25.0) -> PlacementConfig:
    """The named policy for a deployment with this TPOT objective and KV link (baselines ignore both)."""
    factory = policies().get(name)
    if factory is None:
        raise PdorchError(
            ErrorCode.CONFIG, f"unknown placement policy {name!r}; known: {', '.join(policies())}"
        )
    return factory(tpot_target_s=tpot_target_s, kv_link_gbytes_per_s=kv_link_gbytes_per_s)


def is_colocated(config: PlacementConfig) -> bool:
    return config.decider.type == _NEVER.type
