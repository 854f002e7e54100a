"""Placement configuration: profiles of plugins with weights and parameters, the decider, reservations.

Nested in the scheduler's YAML under ``placement:``. Example::

    placement:
      decode:
        filters: [{type: role}, {type: health, params: {require_kv_room: true}}]
        scorers:
          - {type: kv-occupancy, weight: 2}
          - {type: active-requests, weight: 1}
        picker: {type: max-score}
      prefill:
        filters: [{type: role}, {type: health}]
        scorers: [{type: prefill-delay, weight: 1}]
        picker: {type: max-score}
      decider: {mode: conditional}
      reservation: {mode: predicted, output_quantile: 0.9}

The defaults are pdorch's policy (``policies.pdorch``) minus three switches that need support from
the live flow and the deployment: late binding (the ``prefill-backlog`` filter and
``decider.local_max_wait_s``: placement answers NO_WORKER and admission must make the request
wait), ``decider.fallback_to_prefill_node`` (prefill workers must accept whole requests) and
``decider.tpot_target_s`` (the deployment's TPOT objective).

Weights live here, in the profile, never in a scorer (a scorer only says how good each node is, in
[0, 1]). Plugin ``params`` are checked by the plugin's own params Struct when the placer is built.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from transport.errors import ErrorCode, PdorchError


class PluginSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    type: str
    weight: float = 1.0  # scorers only
    params: dict[str, Any] = {}


class ProfileConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    filters: tuple[PluginSpec, ...] = (PluginSpec("role"), PluginSpec("health"))
    scorers: tuple[PluginSpec, ...] = ()
    picker: PluginSpec = PluginSpec("max-score")


class DeciderMode(enum.StrEnum):
    ALWAYS = "always"  # always disaggregate: prefill profile, then decode profile
    NEVER = "never"  # colocated: prefill where the decode profile picked
    THRESHOLD = "threshold"  # disaggregate when uncached prompt tokens exceed threshold_tokens (llm-d)
    CONDITIONAL = "conditional"  # compare estimated time to first token, remote vs local


class DeciderConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    mode: DeciderMode = DeciderMode.CONDITIONAL
    # threshold mode; conditional mode always prefills this few uncached tokens locally.
    threshold_tokens: int = 256
    # conditional: never prefill more uncached tokens than this on a decode node (protects its TPOT).
    local_max_uncached_tokens: int = 65536
    # conditional: prefill locally only when it is estimated at least this much faster (ratio < 1).
    local_speedup: float = 0.8
    # conditional: a decode node's own prefill counts as slower by this factor (it shares the GPU
    # with the decode batch, which it also slows down).
    local_slowdown: float = 1.5
    # KV link speed used to estimate the handoff's cost (bytes / bandwidth).
    kv_link_gbytes_per_s: float = 25.0
    # conditional: when the prefill pool is filtered out (e.g. every node's backlog is too long), the
    # decode node prefills only if its own prefill backlog is at most this (seconds; 0 = no limit);
    # otherwise placement answers NO_WORKER and the request waits in admission.
    local_max_wait_s: float = 0.0
    local_max_wait_relative: float = 0.0  # ... or this times its own uncached prefill time there
    # When no decode node has room: run the request colocated on a node that can prefill and has
    # room for the whole reservation (role "both" first, then "prefill" when this is true).
    fallback_to_prefill_node: bool = False
    # conditional: the time per output token the deployment aims for (0 = ignore). A request whose KV
    # transfer alone, spread over its predicted output, would take more than short_output_share of
    # it (a long prompt with a short answer) stays on its prefill node, colocated, when that node has
    # room for its reservation.
    tpot_target_s: float = 0.0
    short_output_share: float = 0.2
    # Which quantile of the predicted output length that judgement uses.
    short_output_quantile: float = 0.5


class ReservationMode(enum.StrEnum):
    PREDICTED = "predicted"  # prompt + predicted output (quantile below), regrown as it is outgrown
    MAX_TOKENS = "max_tokens"  # prompt + max_tokens: never outgrown, wasteful
    PROMPT = "prompt"  # prompt only (what a node needs to accept the KV handoff)


class ReservationConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    mode: ReservationMode = ReservationMode.PREDICTED
    output_quantile: float = 0.9
    min_output_tokens: int = 16
    # regrow(): a request that outgrows its reservation gets this share of its tokens so far on top.
    regrow_factor: float = 0.5


class AcceleratorProfile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-instance class properties placement may use (dense TFLOPS, HBM GB/s, memory GB)."""

    tflops: float
    hbm_gbytes_per_s: float
    memory_gb: float
    # Prefill throughput to assume when a node does not report one (tokens/s, 0 = derive from tflops).
    prefill_tokens_per_s: float = 0.0


def default_accelerators() -> dict[str, AcceleratorProfile]:
    return {
        "a100": AcceleratorProfile(tflops=312.0, hbm_gbytes_per_s=2039.0, memory_gb=80.0),
        "h100": AcceleratorProfile(tflops=989.0, hbm_gbytes_per_s=3350.0, memory_gb=80.0),
        "l40s": AcceleratorProfile(tflops=362.0, hbm_gbytes_per_s=864.0, memory_gb=48.0),
        "cpu": AcceleratorProfile(
            tflops=2.0, hbm_gbytes_per_s=100.0, memory_gb=16.0, prefill_tokens_per_s=200.0
        ),
    }


def _default_decode() -> ProfileConfig:
    return ProfileConfig(
        filters=(PluginSpec("role"), PluginSpec("health", params={"require_kv_room": True})),
        scorers=(
            PluginSpec("kv-occupancy", weight=2.0),
            PluginSpec("active-requests", weight=1.0),
            PluginSpec("prefix-affinity", weight=2.0),
            PluginSpec("prefill-delay", weight=2.0),
            PluginSpec("accelerator", weight=0.5),
        ),
    )


def _default_prefill() -> ProfileConfig:
    return ProfileConfig(
        scorers=(
            PluginSpec("prefill-delay", weight=1.0),
            PluginSpec("prefix-affinity", weight=1.0),
            PluginSpec("accelerator", weight=0.1),
        )
    )


class PlacementConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    prefill: ProfileConfig = msgspec.field(default_factory=_default_prefill)
    decode: ProfileConfig = msgspec.field(default_factory=_default_decode)
    decider: DeciderConfig = DeciderConfig()
    reservation: ReservationConfig = ReservationConfig()
    accelerators: dict[str, AcceleratorProfile] = msgspec.field(default_factory=default_accelerators)
    # Seeds the random pickers (with the request id), so a decision is reproducible.
    seed: int = 0


def load_placement_config(raw: Any) -> PlacementConfig:
    """Build a config from plain data (a YAML/JSON mapping); structural errors become CONFIG errors.

    Plugin names, weights and parameters are checked when a :class:`~scheduler.placement.framework.Placer`
    is built from the config (the registry knows the plugins).
    """
    try:
        if isinstance(raw, PlacementConfig):
            # Re-validate: a Struct built in code is not type-checked by its constructor.
            return msgspec.convert(msgspec.to_builtins(raw), PlacementConfig)
        return msgspec.convert(raw or {}, PlacementConfig)
    except (msgspec.ValidationError, TypeError) as e:
        raise PdorchError(ErrorCode.CONFIG, f"placement: {e}") from None
