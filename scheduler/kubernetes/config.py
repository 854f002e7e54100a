"""Typed configuration of pdorch on Kubernetes: pod discovery and the LWS autoscaler.

The scheduler nests :class:`KubernetesConfig` under the ``kubernetes:`` key of its config file.
Everything is off by default, so a scheduler outside a cluster never touches the Kubernetes API.
Validation runs once, at the top (``KubernetesConfig.__post_init__``), so every error names the
full key, e.g. ``kubernetes.decode.autoscaling.max_replicas``.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from transport.errors import ErrorCode, PdorchError

POOLS = ("prefill", "decode")

# Kubernetes label keys (optional DNS prefix + name) and values, as the API server checks them.
_LABEL_NAME = r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)"
_LABEL_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_LABEL_NAME}$")
_LABEL_VALUE = re.compile(rf"^({_LABEL_NAME})?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class PoolAutoscalingConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How one pool's replica count follows its load.

    Each load signal gives a *pressure*: what it observes divided by what one replica should
    carry (its target). The pool's pressure is the largest one. Above ``scale_up_at`` the pool
    grows, below ``scale_down_at`` (on every signal at once) it shrinks; in between it holds
    (hysteresis). Either way the new size aims at pressure 1.0. A target of 0 turns that signal off.
    """

    min_replicas: int = 1
    max_replicas: int = 4
    # Groups added or removed in one decision.
    max_step: int = 1
    # Minimum time since the last change before growing / shrinking again.
    scale_up_cooldown_s: float = 60.0
    scale_down_cooldown_s: float = 300.0
    scale_up_at: float = 1.1
    scale_down_at: float = 0.5
    # Requests waiting at the scheduler for this pool, per replica.
    target_queued_per_replica: float = 4.0
    # Mean KV-cache occupancy (0..1) of the pool's workers.
    target_kv_occupancy: float = 0.8
    # Requests running on the pool, per replica.
    target_inflight_per_replica: float = 0.0
    # Predicted demand in tokens (tokens in flight plus predicted output tokens), per replica.
    target_tokens_per_replica: float = 0.0
    # Share of recent requests that met this pool's SLO target (the scheduler's `slo` section: prefill
    # is judged on time to first token, decode on time per output token); below this the pool grows
    # and never shrinks. 0 = off.
    min_slo_attainment: float = 0.0


class PoolConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One worker pool: the LeaderWorkerSet that runs it and the labels that select its pods."""

    lws_name: str
    pod_labels: dict[str, str]
    autoscaling: PoolAutoscalingConfig = msgspec.field(default_factory=PoolAutoscalingConfig)

    def label_selector(self) -> str:
        """The pods of this pool as an equality-based Kubernetes label selector."""
        return ",".join(f"{key}={value}" for key, value in sorted(self.pod_labels.items()))


class DiscoveryConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = False
    # A watch is re-opened after this long (the API server ends it then).
    watch_timeout_s: float = 240.0
    # Bound on one non-watch API call (list).
    request_timeout_s: float = 30.0
    # Back-off between failed list/watch attempts, doubling up to the maximum.
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    # How often terminating workers are checked (idle -> dropped) and drain marks re-asserted.
    tick_s: float = 1.0
    # On a pod marked for deletion: True = stop placing on it and drop it once it is idle (or
    # when its grace period ends); False = drop it at once, failing its running requests.
    drain_terminating: bool = True


class AutoscalerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = False
    interval_s: float = 15.0
    # Before a scale-down: longest wait for the groups being removed to finish their requests.
    drain_timeout_s: float = 120.0
    drain_poll_s: float = 1.0
    request_timeout_s: float = 30.0


def _default_pool(pool: str) -> PoolConfig:
    return PoolConfig(lws_name=f"pdorch-{pool}", pod_labels={"pdorch.io/pool": pool})


class KubernetesConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # "" = the pod's own namespace in a cluster (else "default").
    namespace: str = ""
    # Path of a kubeconfig to use instead of the in-cluster service account ("" = auto).
    kubeconfig: str = ""
    prefill: PoolConfig = msgspec.field(default_factory=lambda: _default_pool("prefill"))
    decode: PoolConfig = msgspec.field(default_factory=lambda: _default_pool("decode"))
    discovery: DiscoveryConfig = msgspec.field(default_factory=DiscoveryConfig)
    autoscaler: AutoscalerConfig = msgspec.field(default_factory=AutoscalerConfig)

    def pools(self) -> dict[str, PoolConfig]:
        return {"prefill": self.prefill, "decode": self.decode}

    def __post_init__(self) -> None:
        _require(
            not self.namespace or bool(_DNS_LABEL.match(self.namespace)),
            "namespace",
            "must be a DNS label (lower-case letters, digits, '-')",
        )
        for pool, cfg in self.pools().items():
            _validate_pool(pool, cfg)
        _require(
            self.prefill.lws_name != self.decode.lws_name,
            "decode.lws_name",
            "must differ from prefill.lws_name",
        )
        _require(
            self.prefill.pod_labels != self.decode.pod_labels,
            "decode.pod_labels",
            "must differ from prefill.pod_labels (each pool needs its own pods)",
        )
        d = self.discovery
        for name in ("watch_timeout_s", "request_timeout_s", "backoff_initial_s", "tick_s"):
            _require(getattr(d, name) > 0, f"discovery.{name}", "must be > 0")
        _require(
            d.backoff_max_s >= d.backoff_initial_s, "discovery.backoff_max_s", "must be >= backoff_initial_s"
        )
        a = self.autoscaler
        for name in ("interval_s", "drain_poll_s", "request_timeout_s"):
            _require(getattr(a, name) > 0, f"autoscaler.{name}", "must be > 0")
        _require(a.drain_timeout_s >= 0, "autoscaler.drain_timeout_s", "must be >= 0")


def _validate_pool(path: str, cfg: PoolConfig) -> None:
    _require(bool(_DNS_LABEL.match(cfg.lws_name)), f"{path}.lws_name", "must be a DNS label")
    _require(bool(cfg.pod_labels), f"{path}.pod_labels", "must select the pool's pods (at least one label)")
    for key, value in cfg.pod_labels.items():
        _require(bool(_LABEL_KEY.match(key)), f"{path}.pod_labels", f"has an invalid label key {key!r}")
        _require(bool(_LABEL_VALUE.match(value)), f"{path}.pod_labels", f"has an invalid value {value!r}")
    s = cfg.autoscaling
    p = f"{path}.autoscaling"
    _require(s.min_replicas >= 1, f"{p}.min_replicas", "must be >= 1")
    _require(s.max_replicas >= s.min_replicas, f"{p}.max_replicas", "must be >= min_replicas")
    _require(s.max_step >= 1, f"{p}.max_step", "must be >= 1")
    for name in ("scale_up_cooldown_s", "scale_down_cooldown_s"):
        _require(getattr(s, name) >= 0, f"{p}.{name}", "must be >= 0")
    # The new size aims at pressure 1.0: it must sit inside the dead band, or the pool would flap.
    _require(0 < s.scale_down_at < 1, f"{p}.scale_down_at", "must be in (0, 1)")
    _require(s.scale_up_at > 1, f"{p}.scale_up_at", "must be > 1")
    for name in ("target_queued_per_replica", "target_inflight_per_replica", "target_tokens_per_replica"):
        _require(getattr(s, name) >= 0, f"{p}.{name}", "must be >= 0 (0 turns the signal off)")
    _require(0 <= s.target_kv_occupancy <= 1, f"{p}.target_kv_occupancy", "must be in [0, 1] (0 = off)")
    _require(0 <= s.min_slo_attainment <= 1, f"{p}.min_slo_attainment", "must be in [0, 1] (0 = off)")
    targets = (
        s.target_queued_per_replica,
        s.target_kv_occupancy,
        s.target_inflight_per_replica,
        s.target_tokens_per_replica,
    )
    _require(any(t > 0 for t in targets), p, "needs at least one target > 0 to measure load")


def _require(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise PdorchError(ErrorCode.CONFIG, f"config key 'kubernetes.{key}' {what}")


def load_kubernetes_config(data: Any) -> KubernetesConfig:
    """Build a :class:`KubernetesConfig` from decoded YAML/JSON (a mapping), with clear errors."""
    try:
        return msgspec.convert(data if data is not None else {}, KubernetesConfig, strict=False)
    except msgspec.ValidationError as e:
        raise PdorchError(ErrorCode.CONFIG, f"invalid kubernetes config: {e}") from None
