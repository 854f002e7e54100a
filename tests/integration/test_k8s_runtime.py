"""Starting discovery and the autoscaler together, and connecting to the API from a kubeconfig."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kubernetes import client

from scheduler.kubernetes.api_client import load_api_client, resolve_namespace
from scheduler.kubernetes.config import AutoscalerConfig, DiscoveryConfig, KubernetesConfig
from scheduler.kubernetes.runtime import kubernetes_runtime
from scheduler.kubernetes.signals import PoolSignals
from tests.integration.test_k8s_fake_api import (
    NAMESPACE,
    FakeKube,
    RecordingDirectory,
    call,
    lws_object,
    lws_pod,
    running_fake_api,
    wait_until,
)
from transport.errors import ErrorCode, PdorchError


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with running_fake_api() as running:
        yield running


def idle(pool: str) -> PoolSignals:
    return PoolSignals(pool=pool, replicas=1, kv_occupancy=0.6)


async def test_runtime_runs_discovery_and_autoscaler(kube: FakeKube) -> None:
    custom = client.CustomObjectsApi(kube.client)
    for name, replicas in (("pdorch-prefill", 0), ("pdorch-decode", 1)):
        await call(
            custom.create_namespaced_custom_object,
            "leaderworkerset.x-k8s.io", "v1", NAMESPACE, "leaderworkersets", lws_object(name, replicas),
        )  # fmt: skip
    await call(
        client.CoreV1Api(kube.client).create_namespaced_pod,
        NAMESPACE,
        lws_pod("pdorch-decode", 0, pool="decode"),
    )
    config = KubernetesConfig(
        namespace=NAMESPACE,
        discovery=DiscoveryConfig(enabled=True, watch_timeout_s=2, request_timeout_s=5),
        autoscaler=AutoscalerConfig(enabled=True, interval_s=3600),
    )
    directory = RecordingDirectory()
    async with kubernetes_runtime(config, directory, idle, api_client=kube.client) as k8s:
        assert k8s.namespace == NAMESPACE and k8s.discovery is not None and k8s.autoscaler is not None
        await wait_until(lambda: directory.expected.get("decode") == {"pdorch-decode-0"}, "discovery running")
        # The first autoscaler step runs at once: prefill is below min_replicas (1).
        await wait_until(lambda: kube.api.lws_replicas("pdorch-prefill") == 1, "autoscaler running")
        watchers = list(k8s.discovery.watchers.values())
    assert all(w.join(0) for w in watchers)


async def test_runtime_does_nothing_when_off(tmp_path: Path) -> None:
    # A kubeconfig that cannot load: proof that nothing tries to reach an API server.
    config = KubernetesConfig(kubeconfig=str(tmp_path / "missing"))
    async with kubernetes_runtime(config, RecordingDirectory(), idle) as k8s:
        assert k8s.discovery is None and k8s.autoscaler is None


async def test_load_api_client_from_kubeconfig(kube: FakeKube, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        f"""
apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{str(kube.api.url).rstrip("/")}"}}}}]
users: [{{name: me, user: {{token: test-token}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: me}}}}]
current-context: fake
"""
    )
    api = load_api_client(str(kubeconfig))
    try:
        await call(
            client.CoreV1Api(api).create_namespaced_pod, NAMESPACE, lws_pod("pdorch-decode", 0, pool="decode")
        )
        pods = await call(client.CoreV1Api(api).list_namespaced_pod, NAMESPACE)
        assert [p.metadata.name for p in pods.items] == ["pdorch-decode-0"]
    finally:
        api.close()
    assert kube.api["get"][-1].headers.get("Authorization") == "Bearer test-token"


def test_bad_kubeconfig_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(PdorchError) as raised:
        load_api_client(str(tmp_path / "missing"))
    assert raised.value.code is ErrorCode.CONFIG


def test_namespace_resolution(tmp_path: Path) -> None:
    own = tmp_path / "namespace"
    assert resolve_namespace("explicit", own) == "explicit"
    assert resolve_namespace("", own) == "default"
    own.write_text("pdorch\n")
    assert resolve_namespace("", own) == "pdorch"
