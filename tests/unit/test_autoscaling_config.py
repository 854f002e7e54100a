"""The Kubernetes/autoscaling config: defaults are safe (all off), and every bad value is named."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from scheduler.kubernetes.config import KubernetesConfig, load_kubernetes_config
from transport.errors import ErrorCode, PdorchError


def test_defaults_are_off_and_valid() -> None:
    config = load_kubernetes_config(None)
    assert not config.discovery.enabled and not config.autoscaler.enabled
    assert config.prefill.lws_name == "pdorch-prefill" and config.decode.lws_name == "pdorch-decode"
    assert config.decode.label_selector() == "pdorch.io/pool=decode"


def test_a_full_config_from_yaml() -> None:
    raw = msgspec.yaml.decode(
        b"""
namespace: pdorch
discovery: {enabled: true}
autoscaler: {enabled: true, interval_s: 10}
decode:
  lws_name: pdorch-decode
  pod_labels: {pdorch.io/pool: decode, app.kubernetes.io/part-of: pdorch}
  autoscaling: {min_replicas: 2, max_replicas: 16, target_kv_occupancy: 0.7, min_slo_attainment: 0.95}
"""
    )
    config = load_kubernetes_config(raw)
    assert config.autoscaler.interval_s == 10
    assert config.decode.autoscaling.max_replicas == 16
    assert config.decode.label_selector() == "app.kubernetes.io/part-of=pdorch,pdorch.io/pool=decode"
    assert config.prefill.lws_name == "pdorch-prefill"  # untouched pools keep their defaults


BAD: list[tuple[dict[str, Any], str]] = [
    ({"namespace": "Not_A_Label"}, "kubernetes.namespace"),
    (
        {"decode": {"lws_name": "pdorch-prefill", "pod_labels": {"pdorch.io/pool": "x"}}},
        "kubernetes.decode.lws_name",
    ),
    (
        {"decode": {"lws_name": "d", "pod_labels": {"pdorch.io/pool": "prefill"}}},
        "kubernetes.decode.pod_labels",
    ),
    ({"prefill": {"lws_name": "p", "pod_labels": {}}}, "kubernetes.prefill.pod_labels"),
    ({"prefill": {"lws_name": "p", "pod_labels": {"bad key!": "x"}}}, "invalid label key"),
    ({"prefill": {"lws_name": "p", "pod_labels": {"a": "bad value!"}}}, "invalid value"),
    (
        {"decode": {"lws_name": "d", "pod_labels": {"a": "b"}, "autoscaling": {"min_replicas": 0}}},
        "min_replicas",
    ),
    (
        {
            "decode": {
                "lws_name": "d",
                "pod_labels": {"a": "b"},
                "autoscaling": {"min_replicas": 3, "max_replicas": 2},
            }
        },
        "kubernetes.decode.autoscaling.max_replicas",
    ),
    ({"decode": {"lws_name": "d", "pod_labels": {"a": "b"}, "autoscaling": {"max_step": 0}}}, "max_step"),
    (
        {"decode": {"lws_name": "d", "pod_labels": {"a": "b"}, "autoscaling": {"scale_up_at": 1.0}}},
        "scale_up_at",
    ),
    (
        {"decode": {"lws_name": "d", "pod_labels": {"a": "b"}, "autoscaling": {"scale_down_at": 1.0}}},
        "scale_down_at",
    ),
    (
        {"decode": {"lws_name": "d", "pod_labels": {"a": "b"}, "autoscaling": {"target_kv_occupancy": 1.5}}},
        "target_kv",
    ),
    (
        {"decode": {"lws_name": "d", "pod_labels": {"a": "b"}, "autoscaling": {"min_slo_attainment": 2}}},
        "min_slo_attainment",
    ),
    (
        {
            "decode": {
                "lws_name": "d",
                "pod_labels": {"a": "b"},
                "autoscaling": {"target_queued_per_replica": 0, "target_kv_occupancy": 0},
            }
        },
        "at least one target",
    ),
    (
        {"decode": {"lws_name": "d", "pod_labels": {"a": "b"}, "autoscaling": {"scale_up_cooldown_s": -1}}},
        "cooldown",
    ),
    ({"discovery": {"tick_s": 0}}, "kubernetes.discovery.tick_s"),
    ({"discovery": {"backoff_initial_s": 5, "backoff_max_s": 1}}, "backoff_max_s"),
    ({"autoscaler": {"interval_s": 0}}, "kubernetes.autoscaler.interval_s"),
    ({"autoscaler": {"drain_timeout_s": -1}}, "drain_timeout_s"),
    ({"autoscaler": {"enabeld": True}}, "enabeld"),  # unknown fields are errors, not ignored
    ({"autoscaler": {"interval_s": "fast"}}, "interval_s"),
]


@pytest.mark.parametrize(("data", "named"), BAD, ids=[named for _, named in BAD])
def test_bad_values_are_config_errors_naming_the_key(data: dict[str, Any], named: str) -> None:
    with pytest.raises(PdorchError) as raised:
        load_kubernetes_config(data)
    assert raised.value.code is ErrorCode.CONFIG
    assert named in raised.value.message


def test_nests_in_another_struct() -> None:
    # The scheduler nests it under `kubernetes:`; validation still runs there.
    class Outer(msgspec.Struct):
        kubernetes: KubernetesConfig = msgspec.field(default_factory=KubernetesConfig)

    assert msgspec.convert({}, Outer).kubernetes.discovery.enabled is False
    with pytest.raises(PdorchError):
        msgspec.convert({"kubernetes": {"autoscaler": {"interval_s": -1}}}, Outer)
