"""An HTTP fake of the Kubernetes API on 127.0.0.1, for tests that drive the official client.

Built on ``kmock.KubernetesEmulator`` (an in-memory API server the official client talks to
unchanged: create/get/patch/list/watch), with what it lacks for pdorch's tests:

- label selectors on list and watch (kmock ignores them);
- ``GET/PATCH .../scale`` answer an ``autoscaling/v1`` Scale (kmock returns the whole object);
- fault injection: failing the next N lists or scale patches, expiring open watches (410 Gone);
- a shared, ordered ``log`` of scale patches, so a test can check what happened before them.

It overrides kmock 0.8's handler methods (``_serve_list`` ...), hence the pin ``kmock<0.9``.
This module also tests the fake itself. Other test modules import it (and its fixtures).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import kmock
import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

PODS = kmock.resource("", "v1", "pods")
LWS = kmock.resource("leaderworkerset.x-k8s.io", "v1", "leaderworkersets")
NAMESPACE = "pdorch-test"


# ---------------------------------------------------------------------------- label selectors

_REQUIREMENT = re.compile(
    r"^\s*(?:(?P<not>!)\s*(?P<absent>[\w./-]+)"
    r"|(?P<key>[\w./-]+)\s*(?:(?P<op>==|=|!=)\s*(?P<value>[\w.-]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?)\s*$"
)


def _split_requirements(selector: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in selector:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current)
    return parts


def selector_matches(selector: str | None, labels: dict[str, str]) -> bool:
    """Kubernetes label selector semantics (equality- and set-based)."""
    for requirement in _split_requirements(selector or ""):
        m = _REQUIREMENT.match(requirement)
        if m is None:
            raise ValueError(f"bad label selector requirement {requirement!r}")
        if m["not"]:
            if m["absent"] in labels:
                return False
            continue
        key = m["key"]
        if m["op"] in ("=", "=="):
            ok = labels.get(key) == m["value"]
        elif m["op"] == "!=":
            ok = labels.get(key) != m["value"]
        elif m["setop"]:
            values = {v.strip() for v in m["values"].split(",") if v.strip()}
            ok = labels.get(key) in values if m["setop"] == "in" else labels.get(key) not in values
        else:
            ok = key in labels
        if not ok:
            return False
    return True


def _labels_of(obj: Any) -> dict[str, str]:
    return ((obj or {}).get("metadata") or {}).get("labels") or {}


# ---------------------------------------------------------------------------- the fake


@attrs.define(kw_only=True)
class FakeKubeApi(kmock.KubernetesEmulator):
    list_failures: int = attrs.field(default=0, init=False)
    scale_patch_failures: int = attrs.field(default=0, init=False)
    # Ordered record of scale patches: ("scale", lws name, replicas). Tests append their own
    # entries (e.g. directory calls) to the same list to check ordering.
    log: list[tuple[Any, ...]] = attrs.field(factory=list, init=False)
    _version: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # Declared up front, so that listing an empty namespace answers an empty list, not 404.
        self.resources["v1/pods"] = kmock.ResourceInfo(kind="Pod", namespaced=True)
        self.resources["leaderworkerset.x-k8s.io/v1/leaderworkersets"] = kmock.ResourceInfo(
            kind="LeaderWorkerSet", namespaced=True, subresources={"scale"}
        )

    async def _serve_list(self, request: kmock.Request) -> kmock.Payload:
        if self.list_failures > 0:
            self.list_failures -= 1
            raise kmock.KubernetesError(status=500, reason="InternalError", message="injected list failure")
        result: Any = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        result["items"] = [item for item in result["items"] if selector_matches(selector, _labels_of(item))]
        self._version += 1
        result["metadata"]["resourceVersion"] = str(self._version)
        return result

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[kmock.Payload]:
        selector = request.params.get("labelSelector")
        async for event in super()._serve_watch(request):
            is_change = isinstance(event, dict) and event.get("type") in ("ADDED", "MODIFIED", "DELETED")
            if is_change and not selector_matches(selector, _labels_of(event.get("object"))):  # type: ignore[union-attr]
                continue
            yield event

    async def _serve_fetch(self, request: kmock.Request) -> kmock.Payload:
        obj = await super()._serve_fetch(request)
        return self._as_scale(obj) if request.subresource == "scale" else obj

    async def _serve_update(self, request: kmock.Request) -> kmock.Payload:
        obj = await super()._serve_update(request)
        if request.subresource != "scale":
            return obj
        scale = self._as_scale(obj)
        self.log.append(("scale", scale["metadata"]["name"], scale["spec"]["replicas"]))
        return scale

    async def _handle(self, request: kmock.Request) -> Any:
        # Fail before kmock's own handler stores the patch, as a real server would.
        if (
            request.subresource == "scale"
            and request.action == kmock.action.UPDATE
            and self.scale_patch_failures
        ):
            self.scale_patch_failures -= 1
            return await self._render_error(
                kmock.KubernetesError(status=500, reason="InternalError", message="injected scale failure")
            )
        return await super()._handle(request)

    @staticmethod
    def _as_scale(obj: Any) -> dict[str, Any]:
        meta = obj.get("metadata") or {}
        replicas = (obj.get("spec") or {}).get("replicas", 1)
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
            "spec": {"replicas": replicas},
            "status": {"replicas": replicas},
        }

    def open_pod_watches(self) -> int:
        """Pod watches subscribed to changes right now (only those see what happens next)."""
        return self._buses[PODS].consumer_count

    async def expire_watches(self, namespace: str = NAMESPACE) -> None:
        """End every open pod watch with an ERROR event 410 Gone, as an API server does."""
        await self._buses[PODS].put(
            {
                "type": "ERROR",
                "object": {
                    "apiVersion": "v1",
                    "kind": "Status",
                    # Namespaced, so that kmock routes it to the watches of that namespace.
                    "metadata": {"namespace": namespace},
                    "status": "Failure",
                    "code": 410,
                    "reason": "Expired",
                    "message": "too old resource version",
                },
            }
        )

    def forget_pod_silently(self, name: str, namespace: str = NAMESPACE) -> None:
        """Remove a pod from the store without any watch event (as if the event was missed)."""
        self.objects[PODS, namespace, name].delete()

    def lws_replicas(self, name: str, namespace: str = NAMESPACE) -> int:
        return int(self.objects[LWS, namespace, name]["spec"]["replicas"])


# ---------------------------------------------------------------------------- the scheduler side


class RecordingDirectory:
    """A small WorkerDirectory (the scheduler's registry is not under test): records every call."""

    def __init__(self, log: list[tuple[Any, ...]] | None = None) -> None:
        self.log: list[tuple[Any, ...]] = log if log is not None else []
        self.expected: dict[str, set[str]] = {}
        self.draining: set[str] = set()
        self.dropped: list[tuple[str, str]] = []
        # worker id -> requests in flight; a list is consumed one value per call (the last repeats).
        self.inflight_by: dict[str, int | list[int]] = {}

    def drop_worker(self, worker_id: str, reason: str) -> None:
        self.log.append(("drop", worker_id, reason))
        self.dropped.append((worker_id, reason))

    def set_expected(self, pool: str, worker_ids: set[str]) -> None:
        self.log.append(("expected", pool, frozenset(worker_ids)))
        self.expected[pool] = set(worker_ids)

    def set_draining(self, worker_id: str, draining: bool) -> None:
        self.log.append(("draining", worker_id, draining))
        if draining:
            self.draining.add(worker_id)
        else:
            self.draining.discard(worker_id)

    def inflight(self, worker_id: str) -> int:
        value = self.inflight_by.get(worker_id, 0)
        script = value if isinstance(value, list) else [value]
        n = script.pop(0) if len(script) > 1 else script[0]
        self.log.append(("inflight", worker_id, n))
        return n

    def dropped_ids(self) -> list[str]:
        return [worker_id for worker_id, _ in self.dropped]


# ---------------------------------------------------------------------------- fixtures and helpers


@attrs.frozen
class FakeKube:
    api: FakeKubeApi  # the server side: its objects, fault injection, log
    client: client.ApiClient  # the official client, pointed at it


@contextlib.asynccontextmanager
async def running_fake_api() -> AsyncIterator[FakeKube]:
    """The fake served on 127.0.0.1 (a free port) with a client for it, for one test."""
    async with FakeKubeApi() as api, kmock.Server(api):
        api_client = client.ApiClient(client.Configuration(host=str(api.url).rstrip("/")))
        try:
            yield FakeKube(api, api_client)
        finally:
            api_client.close()


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with running_fake_api() as running:
        yield running


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking client call off the event loop (the fake server runs on the loop)."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.01)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.01)


def lws_pod(
    lws: str,
    group: int,
    worker: int = 0,
    *,
    pool: str,
    size: int = 1,
    extra_labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A pod as the LWS controller creates it: leader ``<lws>-<g>``, workers ``<lws>-<g>-<w>``."""
    name = f"{lws}-{group}" if worker == 0 else f"{lws}-{group}-{worker}"
    labels = {
        "pdorch.io/pool": pool,
        "pdorch.io/role": pool,
        "leaderworkerset.sigs.k8s.io/name": lws,
        "leaderworkerset.sigs.k8s.io/group-index": str(group),
        "leaderworkerset.sigs.k8s.io/worker-index": str(worker),
        **(extra_labels or {}),
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "uid": str(uuid.uuid4()),
            "labels": labels,
            "annotations": {"leaderworkerset.sigs.k8s.io/size": str(size)},
        },
        "spec": {"containers": [{"name": "agent", "image": "pdorch:test"}]},
    }


def lws_object(name: str, replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"replicas": replicas, "leaderWorkerTemplate": {"size": 1, "workerTemplate": {}}},
    }


# ---------------------------------------------------------------------------- tests of the fake


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("a=1", {"a": "1"}, True),
        ("a=1", {"a": "2"}, False),
        ("a==1,b=2", {"a": "1", "b": "2"}, True),
        ("a==1,b=2", {"a": "1"}, False),
        ("a!=1", {}, True),
        ("a in (x, y)", {"a": "y"}, True),
        ("a notin (x,y)", {"a": "y"}, False),
        ("a", {"a": ""}, True),
        ("!a", {"a": ""}, False),
        ("", {"z": "1"}, True),
    ],
)
def test_selector_semantics(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert selector_matches(selector, labels) is expected


async def test_fake_honours_selectors_and_serves_scale(kube: FakeKube) -> None:
    fake_api, api_client = kube.api, kube.client
    core = client.CoreV1Api(api_client)
    await call(core.create_namespaced_pod, NAMESPACE, lws_pod("pdorch-prefill", 0, pool="prefill"))
    await call(core.create_namespaced_pod, NAMESPACE, lws_pod("pdorch-decode", 0, pool="decode"))
    listed = await call(core.list_namespaced_pod, NAMESPACE, label_selector="pdorch.io/pool=decode")
    assert [p.metadata.name for p in listed.items] == ["pdorch-decode-0"]

    custom = client.CustomObjectsApi(api_client)
    args = ("leaderworkerset.x-k8s.io", "v1", NAMESPACE, "leaderworkersets")
    await call(custom.create_namespaced_custom_object, *args, lws_object("pdorch-decode", 2))
    scale = await call(custom.get_namespaced_custom_object_scale, *args, "pdorch-decode")
    assert scale["kind"] == "Scale" and scale["spec"] == {"replicas": 2}
    await call(custom.patch_namespaced_custom_object_scale, *args, "pdorch-decode", {"spec": {"replicas": 3}})
    assert fake_api.lws_replicas("pdorch-decode") == 3
    assert fake_api.log == [("scale", "pdorch-decode", 3)]

    fake_api.scale_patch_failures = 1
    with pytest.raises(ApiException) as failed:
        await call(
            custom.patch_namespaced_custom_object_scale, *args, "pdorch-decode", {"spec": {"replicas": 1}}
        )
    assert failed.value.status == 500
    assert fake_api.lws_replicas("pdorch-decode") == 3
