"""Pod discovery with the real ``kubernetes`` client against an HTTP fake of the API on loopback."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator

import pytest
from kubernetes import client

from scheduler.kubernetes.config import DiscoveryConfig, KubernetesConfig
from scheduler.kubernetes.discovery import PodDiscovery
from tests.integration.test_k8s_fake_api import (
    NAMESPACE,
    FakeKube,
    RecordingDirectory,
    call,
    lws_pod,
    running_fake_api,
    wait_until,
)


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with running_fake_api() as running:
        yield running


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime.datetime.now(tz=datetime.UTC).timestamp()

    def __call__(self) -> float:
        return self.now


def make_config(**discovery: object) -> KubernetesConfig:
    settings: dict[str, object] = {
        "enabled": True,
        "watch_timeout_s": 2.0,
        "request_timeout_s": 5.0,
        "backoff_initial_s": 0.02,
        "backoff_max_s": 0.1,
        # The test calls tick() itself; the background tick never fires during a test.
        "tick_s": 3600.0,
    }
    settings.update(discovery)
    return KubernetesConfig(namespace=NAMESPACE, discovery=DiscoveryConfig(**settings))  # type: ignore[arg-type]


@pytest.fixture
def directory() -> RecordingDirectory:
    return RecordingDirectory()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def core(kube: FakeKube) -> client.CoreV1Api:
    return client.CoreV1Api(kube.client)


@pytest.fixture
async def discovery(
    kube: FakeKube, core: client.CoreV1Api, directory: RecordingDirectory, clock: FakeClock
) -> AsyncIterator[PodDiscovery]:
    d = PodDiscovery(make_config(), core, directory, namespace=NAMESPACE, clock=clock)
    yield d
    await d.stop()


async def start(discovery: PodDiscovery, kube: FakeKube) -> None:
    """Start, and wait until both pools' watches are subscribed (the fake sends no history)."""
    await discovery.start()
    await wait_until(lambda: kube.api.open_pod_watches() == 2, "both pools watching")


async def create(core: client.CoreV1Api, pod: dict[str, object]) -> None:
    await call(core.create_namespaced_pod, NAMESPACE, pod)


async def merge_patch_pod(core: client.CoreV1Api, name: str, patch: dict[str, object]) -> None:
    await call(
        core.patch_namespaced_pod, name, NAMESPACE, patch, _content_type="application/merge-patch+json"
    )


async def mark_for_deletion(core: client.CoreV1Api, name: str, deadline: float) -> None:
    # What the API server does on a graceful delete: deletionTimestamp = now + grace period; the
    # pod stays until its containers have stopped (here: a finalizer stands for the kubelet).
    stamp = datetime.datetime.fromtimestamp(deadline, tz=datetime.UTC).isoformat()
    patch = {"metadata": {"deletionTimestamp": stamp, "finalizers": ["test.pdorch.io/kubelet"]}}
    await merge_patch_pod(core, name, patch)


async def finish_deletion(core: client.CoreV1Api, name: str) -> None:
    await merge_patch_pod(core, name, {"metadata": {"finalizers": []}})


async def test_pods_appear_and_disappear(
    discovery: PodDiscovery, kube: FakeKube, core: client.CoreV1Api, directory: RecordingDirectory
) -> None:
    await create(core, lws_pod("pdorch-prefill", 0, pool="prefill"))
    await start(discovery, kube)
    await wait_until(
        lambda: (
            directory.expected.get("prefill") == {"pdorch-prefill-0"}
            and directory.expected.get("decode") == set()
        ),
        "first prefill leader, and an empty decode pool",
    )

    # Selected by neither pool: must be ignored. Created first, so its event would come first.
    stray = lws_pod("other", 0, pool="prefill")
    stray["metadata"]["labels"]["pdorch.io/pool"] = "elsewhere"  # type: ignore[index]
    await create(core, stray)
    await create(core, lws_pod("pdorch-prefill", 1, pool="prefill"))
    await create(core, lws_pod("pdorch-decode", 0, pool="decode"))
    await wait_until(
        lambda: (
            directory.expected.get("prefill") == {"pdorch-prefill-0", "pdorch-prefill-1"}
            and directory.expected.get("decode") == {"pdorch-decode-0"}
        ),
        "both pools' leaders",
    )

    await call(core.delete_namespaced_pod, "pdorch-prefill-1", NAMESPACE)
    await wait_until(lambda: "pdorch-prefill-1" in directory.dropped_ids(), "drop on delete")
    assert directory.dropped == [("pdorch-prefill-1", "pod deleted")]
    await wait_until(lambda: directory.expected["prefill"] == {"pdorch-prefill-0"}, "expected set follows")
    assert not any("other" in str(entry) for entry in directory.log)


async def test_terminating_pod_drains_then_drops_when_idle(
    discovery: PodDiscovery,
    kube: FakeKube,
    core: client.CoreV1Api,
    directory: RecordingDirectory,
    clock: FakeClock,
) -> None:
    await create(core, lws_pod("pdorch-decode", 0, pool="decode"))
    await create(core, lws_pod("pdorch-decode", 1, pool="decode"))
    await start(discovery, kube)
    await wait_until(lambda: len(directory.expected.get("decode", ())) == 2, "two decode leaders")
    directory.inflight_by["pdorch-decode-1"] = 2

    await mark_for_deletion(core, "pdorch-decode-1", deadline=clock.now + 60)
    await wait_until(lambda: "pdorch-decode-1" in directory.draining, "draining on deletionTimestamp")
    assert directory.expected["decode"] == {"pdorch-decode-0"}
    discovery.tick()
    assert directory.dropped == []  # two requests still running there

    directory.inflight_by["pdorch-decode-1"] = 0
    discovery.tick()
    assert directory.dropped == [("pdorch-decode-1", "pod terminating (idle)")]
    discovery.tick()
    assert len(directory.dropped) == 1

    # When the pod is finally gone, it is dropped again (harmless) and its drain mark forgotten.
    await finish_deletion(core, "pdorch-decode-1")
    await wait_until(lambda: len(directory.dropped) == 2, "drop on final delete")
    assert directory.dropped[-1] == ("pdorch-decode-1", "pod deleted")
    marks = directory.log.count(("draining", "pdorch-decode-1", True))
    discovery.tick()  # re-asserts drain marks: none is left for the deleted pod
    assert directory.log.count(("draining", "pdorch-decode-1", True)) == marks


async def test_terminating_pod_is_dropped_when_its_grace_period_ends(
    discovery: PodDiscovery,
    kube: FakeKube,
    core: client.CoreV1Api,
    directory: RecordingDirectory,
    clock: FakeClock,
) -> None:
    await create(core, lws_pod("pdorch-prefill", 0, pool="prefill"))
    await start(discovery, kube)
    await wait_until(lambda: directory.expected.get("prefill") == {"pdorch-prefill-0"}, "leader seen")
    directory.inflight_by["pdorch-prefill-0"] = 3
    await mark_for_deletion(core, "pdorch-prefill-0", deadline=clock.now + 30)
    await wait_until(lambda: "pdorch-prefill-0" in directory.draining, "draining")

    clock.now += 29
    discovery.tick()
    assert directory.dropped == []
    clock.now += 2
    discovery.tick()
    assert directory.dropped == [("pdorch-prefill-0", "pod terminating (grace period over)")]


async def test_a_replaced_pod_does_not_inherit_the_old_ones_drain(
    discovery: PodDiscovery,
    kube: FakeKube,
    core: client.CoreV1Api,
    directory: RecordingDirectory,
    clock: FakeClock,
) -> None:
    await create(core, lws_pod("pdorch-decode", 0, pool="decode"))
    await start(discovery, kube)
    await wait_until(lambda: directory.expected.get("decode") == {"pdorch-decode-0"}, "leader seen")
    directory.inflight_by["pdorch-decode-0"] = 1
    await mark_for_deletion(core, "pdorch-decode-0", deadline=clock.now + 60)
    await wait_until(lambda: "pdorch-decode-0" in directory.draining, "draining")

    # Its deletion is missed; LWS recreates the group: a new pod, same name, new uid.
    kube.api.forget_pod_silently("pdorch-decode-0")
    await create(core, lws_pod("pdorch-decode", 0, pool="decode"))
    await wait_until(lambda: "pdorch-decode-0" not in directory.draining, "the new pod is not draining")
    assert directory.expected["decode"] == {"pdorch-decode-0"}
    directory.inflight_by["pdorch-decode-0"] = 0
    clock.now += 3600
    discovery.tick()
    assert directory.dropped == []  # nothing pending for the old incarnation
    assert directory.log.count(("draining", "pdorch-decode-0", True)) == 1  # and no re-assert


async def test_drop_at_once_when_not_draining_terminating_pods(
    kube: FakeKube, core: client.CoreV1Api, directory: RecordingDirectory
) -> None:
    pod = lws_pod("pdorch-decode", 0, pool="decode")
    # A finalizer makes the fake (like a real server) mark the pod instead of removing it.
    pod["metadata"]["finalizers"] = ["test.pdorch.io/hold"]  # type: ignore[index]
    await create(core, pod)
    d = PodDiscovery(make_config(drain_terminating=False), core, directory, namespace=NAMESPACE)
    await start(d, kube)
    try:
        await wait_until(lambda: directory.expected.get("decode") == {"pdorch-decode-0"}, "leader seen")
        directory.inflight_by["pdorch-decode-0"] = 5
        await call(core.delete_namespaced_pod, "pdorch-decode-0", NAMESPACE)
        await wait_until(lambda: directory.dropped != [], "drop on deletionTimestamp")
        assert directory.dropped == [("pdorch-decode-0", "pod terminating")]
        assert directory.expected["decode"] == set()
    finally:
        await d.stop()


async def test_watch_expiry_relists_and_continues(
    discovery: PodDiscovery, kube: FakeKube, core: client.CoreV1Api, directory: RecordingDirectory
) -> None:
    await create(core, lws_pod("pdorch-decode", 0, pool="decode"))
    await create(core, lws_pod("pdorch-decode", 1, pool="decode"))
    await start(discovery, kube)
    await wait_until(lambda: len(directory.expected.get("decode", ())) == 2, "two decode leaders")
    watcher = discovery.watchers["decode"]
    assert watcher.lists == 1

    # The deletion of decode-1 is missed (no event); then the watches expire (410 Gone).
    await wait_until(lambda: kube.api.open_pod_watches() == 2, "both pools watching")
    kube.api.forget_pod_silently("pdorch-decode-1")
    await kube.api.expire_watches()
    await wait_until(lambda: watcher.lists >= 2, "re-list after 410")
    await wait_until(lambda: directory.dropped != [], "the missed deletion found on re-list")
    assert directory.dropped == [("pdorch-decode-1", "pod deleted (found on re-list)")]
    assert watcher.failures == 0  # a 410 is not a failure: no back-off

    # And the watch goes on after the re-list.
    await create(core, lws_pod("pdorch-decode", 2, pool="decode"))
    await wait_until(
        lambda: directory.expected["decode"] == {"pdorch-decode-0", "pdorch-decode-2"}, "watch resumed"
    )


async def test_api_errors_are_retried_with_backoff(
    discovery: PodDiscovery, kube: FakeKube, core: client.CoreV1Api, directory: RecordingDirectory
) -> None:
    await create(core, lws_pod("pdorch-prefill", 0, pool="prefill"))
    kube.api.list_failures = 3
    await start(discovery, kube)
    await wait_until(
        lambda: directory.expected.get("prefill") == {"pdorch-prefill-0"} and "decode" in directory.expected,
        "lists succeed after the injected failures",
    )
    watchers = discovery.watchers.values()
    # Counted by each thread right after its failed call: wait for the last count to land.
    await wait_until(lambda: sum(w.failures for w in watchers) == 3, "three failures counted")
    assert kube.api.list_failures == 0


async def test_incomplete_group_drains_its_leader_until_whole(
    discovery: PodDiscovery, kube: FakeKube, core: client.CoreV1Api, directory: RecordingDirectory
) -> None:
    await create(core, lws_pod("pdorch-prefill", 0, 0, pool="prefill", size=2))
    await create(core, lws_pod("pdorch-prefill", 0, 1, pool="prefill", size=2))
    await start(discovery, kube)
    await wait_until(lambda: directory.expected.get("prefill") == {"pdorch-prefill-0"}, "leader seen")
    assert "pdorch-prefill-0" not in directory.draining

    await call(core.delete_namespaced_pod, "pdorch-prefill-0-1", NAMESPACE)
    await wait_until(lambda: "pdorch-prefill-0" in directory.draining, "leader drains when a worker pod goes")
    assert directory.dropped == []  # a worker pod is not a registered worker

    await create(core, lws_pod("pdorch-prefill", 0, 1, pool="prefill", size=2))
    await wait_until(lambda: "pdorch-prefill-0" not in directory.draining, "released when the group is whole")


async def test_stop_ends_the_watch_threads(
    discovery: PodDiscovery, kube: FakeKube, directory: RecordingDirectory
) -> None:
    await start(discovery, kube)
    await wait_until(lambda: set(directory.expected) == {"prefill", "decode"}, "both pools listed")
    watchers = list(discovery.watchers.values())
    await discovery.stop()
    assert all(w.join(0) for w in watchers)


async def test_run_until_cancelled(
    kube: FakeKube, core: client.CoreV1Api, directory: RecordingDirectory
) -> None:
    d = PodDiscovery(make_config(), core, directory, namespace=NAMESPACE)
    task = asyncio.create_task(d.run())
    await wait_until(lambda: set(directory.expected) == {"prefill", "decode"}, "running")
    watchers = list(d.watchers.values())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert watchers and all(w.join(0) for w in watchers)
