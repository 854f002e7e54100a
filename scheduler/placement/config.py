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
      handler: {type: slo}
      reservation: {mode: predicted, output_quantile: 0.9}

The defaults are pdorch's policy, the one the simulator measures (``policies.pdorch`` is
``PlacementConfig()``): the ``slo`` profile handler (the pair with the most headroom on predicted
TTFT and TPOT, a prefill node running a whole request when its pool has spare decode capacity);
the profiles' filters choose its candidates and their scorers break ties. A section that sets
some fields keeps these defaults for the rest.

Weights live here, in the profile, never in a scorer (a scorer only says how good each node is, in
[0, 1]). Plugin ``params`` (the decider's too) are checked by the plugin's own params Struct when
the placer is built.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any

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

    def validate(self) -> None:
        where = "placement.reservation"
        if not 0.0 < self.output_quantile < 1.0:
            raise PdorchError(
                ErrorCode.CONFIG, f"{where}.output_quantile must be in (0, 1), got {self.output_quantile}"
            )
        if self.regrow_factor < 0 or self.min_output_tokens < 0:
            raise PdorchError(ErrorCode.CONFIG, f"{where}.regrow_factor and min_output_tokens must be >= 0")


# A rank-16 adapter of a 70B model is ~100-300 MB: read from host memory or a local disk and
# copied to the GPUs it takes tens to a hundred milliseconds.
DEFAULT_ADAPTER_LOAD_S = 0.1


# Checked when a config is loaded: the latency models' priors come from these, and a prior that is
# zero, negative or NaN would make every prediction of that class meaningless.
_Positive = Annotated[float, msgspec.Meta(gt=0)]
_NonNegative = Annotated[float, msgspec.Meta(ge=0)]


class AcceleratorProfile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-instance class properties placement may use (dense TFLOPS, HBM GB/s, memory GB)."""

    tflops: _Positive
    hbm_gbytes_per_s: _Positive
    memory_gb: _Positive
    # Prefill throughput to assume when a node does not report one (tokens/s, 0 = derive from tflops).
    prefill_tokens_per_s: _NonNegative = 0.0
    # Seconds to load a LoRA adapter into a free slot on this class (placement's estimate of the
    # cost of sending a request where its adapter is not resident).
    adapter_load_s: _NonNegative = DEFAULT_ADAPTER_LOAD_S


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
    # The slo handler chooses on predictions; the filters give its candidates, and the scorers
    # break ties: a LoRA adapter's residents first, then the node with the fewest requests (a
    # busy and an idle node can be predicted alike where a batch costs little; a draw seeded by the
    # request breaks what is left).
    return ProfileConfig(
        filters=(
            PluginSpec("role"),
            PluginSpec("health", params={"require_kv_room": True}),
            PluginSpec("adapter-slots"),
        ),
        scorers=(PluginSpec("adapter-affinity"), PluginSpec("active-requests")),
    )


def _default_prefill() -> ProfileConfig:
    return ProfileConfig(
        filters=(PluginSpec("role"), PluginSpec("health"), PluginSpec("adapter-slots")),
        scorers=(PluginSpec("adapter-affinity"),),
    )


class PlacementConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    prefill: ProfileConfig = msgspec.field(default_factory=_default_prefill)
    decode: ProfileConfig = msgspec.field(default_factory=_default_decode)
    # Runs the profiles and returns the placement: "pd" (the decode pick, then the decider) or "slo"
    # (the pair with the most headroom on predicted TTFT and TPOT), with its own parameters.
    handler: PluginSpec = PluginSpec("slo")
    # The "pd" handler's decider: whether and where to prefill, given the decode pick.
    decider: PluginSpec = PluginSpec("conditional")
    # A prefill node may run a whole request: the slo handler's third tier (the prefill pool lends
    # decode capacity), the pd handler's fallback when no decode node has room ("both" nodes first).
    # Every pdorch engine runs whole requests on any role; false keeps prefill nodes to prefill.
    fallback_to_prefill_node: bool = True
    reservation: ReservationConfig = ReservationConfig()
    accelerators: dict[str, AcceleratorProfile] = msgspec.field(default_factory=default_accelerators)
    # Seeds the random pickers (with the request id), so a decision is reproducible.
    seed: int = 0
    # A decision looks at this many nodes of each pool and accelerator class, drawn by the request
    # (power of k choices), plus those holding the most of its prompt's prefix, and at every node
    # only when those cannot take it within their own pools (it would wait, be shed, or lend a node
    # to the other phase). A class of at most this many nodes is looked at whole. 0: every node.
    sample: Annotated[int, msgspec.Meta(ge=0)] = 8


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
