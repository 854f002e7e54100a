"""Start and stop discovery and the autoscaler together (for the scheduler's composition root).

Usage in an aiohttp cleanup context::

    async def kubernetes_ctx(app):
        async with kubernetes_runtime(cfg.kubernetes, cluster, signals_for_pool) as k8s:
            app[K8S_KEY] = k8s
            yield
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from kubernetes import client

from scheduler.kubernetes.api_client import load_api_client, resolve_namespace
from scheduler.kubernetes.autoscaler import Autoscaler
from scheduler.kubernetes.config import KubernetesConfig
from scheduler.kubernetes.directory import WorkerDirectory
from scheduler.kubernetes.discovery import PodDiscovery
from scheduler.kubernetes.drain_reasons import DrainReasons
from scheduler.kubernetes.lws_api import LwsScaleApi
from scheduler.kubernetes.signals import SignalSource


@dataclass(frozen=True)
class KubernetesRuntime:
    namespace: str = ""
    discovery: PodDiscovery | None = None
    autoscaler: Autoscaler | None = None


@contextlib.asynccontextmanager
async def kubernetes_runtime(
    config: KubernetesConfig,
    directory: WorkerDirectory,
    signals: SignalSource,
    *,
    api_client: client.ApiClient | None = None,
) -> AsyncIterator[KubernetesRuntime]:
    """Run what ``config`` enables; nothing at all (and no API access) when both are off."""
    if not (config.discovery.enabled or config.autoscaler.enabled):
        yield KubernetesRuntime()
        return
    own_client = api_client is None
    api = api_client or await asyncio.to_thread(load_api_client, config.kubeconfig)
    namespace = resolve_namespace(config.namespace)
    drains = DrainReasons(directory)
    discovery = None
    autoscaler = None
    autoscaler_task: asyncio.Task[None] | None = None
    try:
        if config.discovery.enabled:
            core = client.CoreV1Api(api)
            discovery = PodDiscovery(config, core, directory, namespace=namespace, drains=drains)
            await discovery.start()
        if config.autoscaler.enabled:
            scale = LwsScaleApi(api, namespace, config.autoscaler.request_timeout_s)
            autoscaler = Autoscaler(config, scale, directory, signals, drains=drains)
            autoscaler_task = asyncio.create_task(autoscaler.run(), name="pdorch-autoscaler")
        yield KubernetesRuntime(namespace, discovery, autoscaler)
    finally:
        if autoscaler_task is not None:
            autoscaler_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await autoscaler_task
        if discovery is not None:
            await discovery.stop()
        if own_client:
            api.close()
