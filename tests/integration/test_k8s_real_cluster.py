"""Discovery and the scale subresource against a real cluster: runs only when KUBECONFIG is set.

Read-only: it never changes the cluster. Deploy an overlay first (docs/kubernetes.md); the
namespace is PDORCH_K8S_NAMESPACE (default "pdorch").
"""

from __future__ import annotations

import asyncio
import os

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from scheduler.kubernetes.api_client import load_api_client
from scheduler.kubernetes.config import DiscoveryConfig, KubernetesConfig
from scheduler.kubernetes.discovery import PodDiscovery
from scheduler.kubernetes.lws_api import LWS_GROUP, LWS_PLURAL, LWS_VERSION, LwsScaleApi
from scheduler.kubernetes.pod_info import parse_pod
from tests.integration.test_k8s_fake_api import RecordingDirectory, wait_until

pytestmark = pytest.mark.skipif(
    not os.environ.get("KUBECONFIG"), reason="needs a real cluster (set KUBECONFIG)"
)

NAMESPACE = os.environ.get("PDORCH_K8S_NAMESPACE", "pdorch")


@pytest.fixture
def api() -> client.ApiClient:
    api_client = load_api_client(os.environ["KUBECONFIG"])
    custom = client.CustomObjectsApi(api_client)
    try:
        sets = custom.list_namespaced_custom_object(
            LWS_GROUP, LWS_VERSION, NAMESPACE, LWS_PLURAL, _request_timeout=30
        )
    except ApiException as e:
        pytest.skip(f"no LeaderWorkerSets readable in namespace {NAMESPACE} ({e.status} {e.reason})")
    names = {item["metadata"]["name"] for item in sets["items"]}
    if not {"pdorch-prefill", "pdorch-decode"} <= names:
        pytest.skip(f"pdorch is not deployed in namespace {NAMESPACE} (found {sorted(names)})")
    return api_client


async def test_discovery_sees_the_leaders_the_api_lists(api: client.ApiClient) -> None:
    config = KubernetesConfig(
        namespace=NAMESPACE, discovery=DiscoveryConfig(enabled=True, watch_timeout_s=30)
    )
    core = client.CoreV1Api(api)
    directory = RecordingDirectory()
    discovery = PodDiscovery(config, core, directory, namespace=NAMESPACE)
    await discovery.start()
    try:
        await wait_until(lambda: set(directory.expected) == {"prefill", "decode"}, "both pools listed", 60)
        for pool, pool_config in config.pools().items():
            listed = await asyncio.to_thread(
                core.list_namespaced_pod,
                NAMESPACE,
                label_selector=pool_config.label_selector(),
                _request_timeout=30,
            )
            leaders = {
                p.metadata.name
                for p in listed.items
                if p.metadata.deletion_timestamp is None
                and parse_pod({"metadata": {"name": p.metadata.name, "labels": p.metadata.labels}}).is_leader
            }
            assert directory.expected[pool] == leaders
    finally:
        await discovery.stop()


async def test_scale_subresource_reads_spec_replicas(api: client.ApiClient) -> None:
    scale = LwsScaleApi(api, NAMESPACE, request_timeout_s=30)
    custom = client.CustomObjectsApi(api)
    for name in ("pdorch-prefill", "pdorch-decode"):
        lws = await asyncio.to_thread(
            custom.get_namespaced_custom_object, LWS_GROUP, LWS_VERSION, NAMESPACE, LWS_PLURAL, name
        )
        assert await asyncio.to_thread(scale.get_replicas, name) == lws["spec"]["replicas"]
