"""The autoscaler with the real ``kubernetes`` client against an HTTP fake of the API on loopback.

Time is a fake clock; the autoscaler's sleep advances it, so cooldowns and drain timeouts are
exercised without waiting, and nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import msgspec
import pytest
from kubernetes import client

from scheduler.admission.gate import AdmissionGate
from scheduler.cluster import Cluster
from scheduler.kubernetes.autoscaler import Autoscaler
from scheduler.kubernetes.config import AutoscalerConfig, KubernetesConfig, PoolAutoscalingConfig, PoolConfig
from scheduler.kubernetes.lws_api import LwsScaleApi
from scheduler.kubernetes.signals import PoolSignals, SignalSource
from scheduler.pool_signals import pool_signals
from scheduler.slo_window import SloConfig, SloWindow
from tests.integration.test_k8s_fake_api import (
    NAMESPACE,
    FakeKube,
    FakeKubeApi,
    RecordingDirectory,
    call,
    lws_object,
    running_fake_api,
)
from transport.messages import PROTOCOL_VERSION, Hello, Role


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with running_fake_api() as running:
        yield running


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


POLICY = PoolAutoscalingConfig(
    min_replicas=1,
    max_replicas=4,
    max_step=1,
    scale_up_cooldown_s=60,
    scale_down_cooldown_s=300,
    scale_up_at=1.2,
    scale_down_at=0.5,
    target_queued_per_replica=4,
    target_kv_occupancy=0.8,
)


def make_config(policy: PoolAutoscalingConfig = POLICY, drain_timeout_s: float = 120) -> KubernetesConfig:
    return KubernetesConfig(
        namespace=NAMESPACE,
        prefill=PoolConfig(
            lws_name="pdorch-prefill", pod_labels={"pdorch.io/pool": "prefill"}, autoscaling=policy
        ),
        decode=PoolConfig(
            lws_name="pdorch-decode", pod_labels={"pdorch.io/pool": "decode"}, autoscaling=policy
        ),
        autoscaler=AutoscalerConfig(
            enabled=True, interval_s=15, drain_timeout_s=drain_timeout_s, drain_poll_s=1
        ),
    )


class Load:
    """The signals the scheduler would report, per pool, set by the test."""

    def __init__(self) -> None:
        self.by_pool: dict[str, PoolSignals] = {}

    def set(self, pool: str, replicas: int, queued: int = 0, kv: float = 0.4) -> None:
        self.by_pool[pool] = PoolSignals(
            pool=pool, replicas=replicas, queued_requests=queued, kv_occupancy=kv
        )

    def __call__(self, pool: str) -> PoolSignals:
        return self.by_pool[pool]


async def make_lws(api: client.ApiClient, name: str, replicas: int) -> None:
    custom = client.CustomObjectsApi(api)
    await call(
        custom.create_namespaced_custom_object,
        "leaderworkerset.x-k8s.io",
        "v1",
        NAMESPACE,
        "leaderworkersets",
        lws_object(name, replicas),
    )


@pytest.fixture
def time_() -> FakeTime:
    return FakeTime()


@pytest.fixture
def load() -> Load:
    value = Load()
    value.set("prefill", replicas=1)
    value.set("decode", replicas=1)
    return value


@pytest.fixture
def directory(kube: FakeKube) -> RecordingDirectory:
    # Directory calls go into the fake API's log, so their order against scale patches shows.
    return RecordingDirectory(log=kube.api.log)


def make_autoscaler(
    api: client.ApiClient,
    directory: RecordingDirectory,
    load: SignalSource,
    time_: FakeTime,
    config: KubernetesConfig | None = None,
) -> Autoscaler:
    config = config or make_config()
    scale = LwsScaleApi(api, NAMESPACE, request_timeout_s=5)
    return Autoscaler(config, scale, directory, load, clock=time_.clock, sleep=time_.sleep)


def patches(fake: FakeKubeApi, lws: str) -> list[int]:
    return [entry[2] for entry in fake.log if entry[0] == "scale" and entry[1] == lws]


async def test_load_rises_and_falls(
    kube: FakeKube,
    directory: RecordingDirectory,
    load: Load,
    time_: FakeTime,
) -> None:
    await make_lws(kube.client, "pdorch-prefill", 2)
    await make_lws(kube.client, "pdorch-decode", 1)
    scaler = make_autoscaler(kube.client, directory, load, time_)

    # Prefill overloaded: 2 serving replicas, 16 queued = pressure 2.0 -> wants 4, max_step 1 -> 3.
    load.set("prefill", replicas=2, queued=16)
    decisions = await scaler.step()
    assert decisions["prefill"].desired == 3 and decisions["prefill"].dominant == "queue"
    assert patches(kube.api, "pdorch-prefill") == [3]
    assert kube.api.lws_replicas("pdorch-prefill") == 3
    assert patches(kube.api, "pdorch-decode") == []  # decode within band

    time_.now += 10  # in the scale-up cooldown
    load.set("prefill", replicas=3, queued=24)
    await scaler.step()
    assert patches(kube.api, "pdorch-prefill") == [3]

    time_.now += 60
    await scaler.step()
    assert patches(kube.api, "pdorch-prefill") == [3, 4]

    time_.now += 120  # still overloaded, but at max_replicas
    load.set("prefill", replicas=4, queued=40)
    decisions = await scaler.step()
    assert "max_replicas" in decisions["prefill"].reason
    assert patches(kube.api, "pdorch-prefill") == [3, 4]

    # Load falls: pressure 0.25 (<0.5) -> ceil(4 x 0.25) = 1 -> one step down, after the cooldown.
    load.set("prefill", replicas=4, queued=4, kv=0.1)
    time_.now += 10  # 190s since the last change < 300s
    await scaler.step()
    assert patches(kube.api, "pdorch-prefill") == [3, 4]
    time_.now += 200
    await scaler.step()
    assert patches(kube.api, "pdorch-prefill") == [3, 4, 3]
    assert kube.api.lws_replicas("pdorch-prefill") == 3
    assert ("draining", "pdorch-prefill-3", True) in kube.api.log


async def test_hysteresis_holds_inside_the_band(
    kube: FakeKube,
    directory: RecordingDirectory,
    load: Load,
    time_: FakeTime,
) -> None:
    await make_lws(kube.client, "pdorch-prefill", 2)
    await make_lws(kube.client, "pdorch-decode", 2)
    scaler = make_autoscaler(kube.client, directory, load, time_)
    # Pressures 0.55..1.15: above scale_down_at 0.5 and below scale_up_at 1.2.
    for kv in (0.44, 0.6, 0.92, 0.7, 0.5):
        load.set("decode", replicas=2, queued=0, kv=kv)
        load.set("prefill", replicas=2, queued=9, kv=0.1)
        time_.now += 1000
        decisions = await scaler.step()
        assert decisions["decode"].desired == 2 and decisions["prefill"].desired == 2
    assert [e for e in kube.api.log if e[0] == "scale"] == []


async def test_scale_down_drains_before_it_patches(
    kube: FakeKube,
    directory: RecordingDirectory,
    load: Load,
    time_: FakeTime,
) -> None:
    await make_lws(kube.client, "pdorch-prefill", 1)
    await make_lws(kube.client, "pdorch-decode", 3)
    scaler = make_autoscaler(kube.client, directory, load, time_)
    # The group being removed (index 2, the highest) still runs requests: 2, then 1, then none.
    directory.inflight_by["pdorch-decode-2"] = [2, 1, 0]
    load.set("decode", replicas=3, queued=0, kv=0.1)

    await scaler.step()

    assert patches(kube.api, "pdorch-decode") == [2]
    events = [e for e in kube.api.log if e[1] in ("pdorch-decode-2", "pdorch-decode")]
    assert events == [
        ("draining", "pdorch-decode-2", True),
        ("inflight", "pdorch-decode-2", 2),
        ("inflight", "pdorch-decode-2", 1),
        ("inflight", "pdorch-decode-2", 0),
        ("scale", "pdorch-decode", 2),
    ]
    # Groups that stay were never touched.
    assert not any(
        e[0] == "draining" and e[1] in ("pdorch-decode-0", "pdorch-decode-1") for e in kube.api.log
    )


async def test_drain_is_bounded_by_its_timeout(
    kube: FakeKube,
    directory: RecordingDirectory,
    load: Load,
    time_: FakeTime,
) -> None:
    await make_lws(kube.client, "pdorch-prefill", 1)
    await make_lws(kube.client, "pdorch-decode", 2)
    scaler = make_autoscaler(kube.client, directory, load, time_, make_config(drain_timeout_s=30))
    directory.inflight_by["pdorch-decode-1"] = 4  # never finishes
    load.set("decode", replicas=2, kv=0.05)
    start = time_.now

    await scaler.step()

    assert patches(kube.api, "pdorch-decode") == [1]
    assert time_.now - start >= 30
    first_drain = kube.api.log.index(("draining", "pdorch-decode-1", True))
    assert kube.api.log.index(("scale", "pdorch-decode", 1)) > first_drain


async def test_failed_patch_undoes_the_drain_and_retries(
    kube: FakeKube,
    directory: RecordingDirectory,
    load: Load,
    time_: FakeTime,
) -> None:
    await make_lws(kube.client, "pdorch-prefill", 1)
    await make_lws(kube.client, "pdorch-decode", 2)
    scaler = make_autoscaler(kube.client, directory, load, time_)
    load.set("decode", replicas=2, kv=0.05)
    kube.api.scale_patch_failures = 1

    decisions = await scaler.step()

    assert "decode" not in decisions  # the pool's step failed and was logged
    assert kube.api.lws_replicas("pdorch-decode") == 2
    assert directory.draining == set()
    assert ("draining", "pdorch-decode-1", False) in kube.api.log

    await scaler.step()  # no cooldown was started by the failure
    assert kube.api.lws_replicas("pdorch-decode") == 1


async def test_bounds_are_enforced_at_once(
    kube: FakeKube,
    directory: RecordingDirectory,
    load: Load,
    time_: FakeTime,
) -> None:
    await make_lws(kube.client, "pdorch-prefill", 0)
    await make_lws(kube.client, "pdorch-decode", 6)
    scaler = make_autoscaler(kube.client, directory, load, time_)
    load.set("prefill", replicas=0)
    load.set("decode", replicas=6, kv=0.7)

    await scaler.step()

    assert kube.api.lws_replicas("pdorch-prefill") == 1
    assert kube.api.lws_replicas("pdorch-decode") == 4
    assert {"pdorch-decode-4", "pdorch-decode-5"} <= directory.draining


async def test_scaled_back_up_groups_are_released(
    kube: FakeKube,
    directory: RecordingDirectory,
    load: Load,
    time_: FakeTime,
) -> None:
    await make_lws(kube.client, "pdorch-prefill", 1)
    await make_lws(kube.client, "pdorch-decode", 2)
    scaler = make_autoscaler(kube.client, directory, load, time_)
    load.set("decode", replicas=2, kv=0.05)
    await scaler.step()
    assert "pdorch-decode-1" in directory.draining

    # Load comes back; decode-1 is recreated by the scale-up and must take work again.
    load.set("decode", replicas=1, queued=12, kv=0.9)
    time_.now += 1000
    await scaler.step()
    assert kube.api.lws_replicas("pdorch-decode") == 2
    await scaler.step()
    assert "pdorch-decode-1" not in directory.draining


async def test_run_is_off_unless_enabled(
    kube: FakeKube,
    directory: RecordingDirectory,
    load: Load,
    time_: FakeTime,
) -> None:
    config = make_config()
    config.autoscaler.enabled = False
    scaler = make_autoscaler(kube.client, directory, load, time_, config)
    await asyncio.wait_for(scaler.run(), timeout=10)
    assert kube.api.log == []


async def test_run_loops_every_interval(
    kube: FakeKube,
    directory: RecordingDirectory,
    load: Load,
    time_: FakeTime,
) -> None:
    await make_lws(kube.client, "pdorch-prefill", 1)
    await make_lws(kube.client, "pdorch-decode", 1)
    scaler = make_autoscaler(kube.client, directory, load, time_)
    load.set("prefill", replicas=1, queued=40)
    task = asyncio.create_task(scaler.run())
    try:
        # Each interval is 15 fake seconds; the 60s cooldown lets one step through every 4 loops.
        await asyncio.wait_for(_until(lambda: kube.api.lws_replicas("pdorch-prefill") == 3), timeout=15)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert patches(kube.api, "pdorch-prefill")[:2] == [2, 3]


async def _until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


def idle_cluster(decode: int) -> Cluster:
    """A scheduler's registry with one prefill and ``decode`` decode workers, all idle."""
    cluster = Cluster(heartbeat_interval_s=1.0, heartbeat_liveness=3, on_lost=lambda *_: None)
    roles = [("pdorch-prefill-0", Role.PREFILL)] + [
        (f"pdorch-decode-{i}", Role.DECODE) for i in range(decode)
    ]
    for worker_id, role in roles:
        hello = Hello(
            PROTOCOL_VERSION, worker_id, role, "reference", "m", 4096, 16, 1000, kv_endpoint="tcp://x:1"
        )
        cluster.register(worker_id.encode(), hello, now=0.0)
    return cluster


async def test_low_slo_attainment_holds_a_scale_down(
    kube: FakeKube,
    directory: RecordingDirectory,
    time_: FakeTime,
) -> None:
    """The scheduler's measured attainment reaches the autoscaler through the pool signals: an idle
    decode pool whose requests miss their TPOT target is not shrunk until the misses age out."""
    await make_lws(kube.client, "pdorch-prefill", 1)
    await make_lws(kube.client, "pdorch-decode", 2)
    cluster, admission = idle_cluster(decode=2), AdmissionGate()
    slo = SloWindow(SloConfig(ttft_s=1.0, tpot_s=0.1, window_s=60, min_requests=5), clock=time_.clock)
    guarded = msgspec.structs.replace(POLICY, max_replicas=2, min_slo_attainment=0.9)
    scaler = make_autoscaler(
        kube.client,
        directory,
        lambda pool: pool_signals(cluster, admission, slo, pool),
        time_,
        make_config(guarded),
    )
    for _ in range(10):
        slo.record(ttft_s=0.2, tpot_s=0.5)  # first tokens in time, decoding too slow

    decisions = await scaler.step()

    # Idle (pressure 0 < scale_down_at) yet held: the decode pool's TPOT attainment is 0.
    decode = decisions["decode"]
    assert decode.desired == 2 and decode.pressure < guarded.scale_down_at
    assert "SLO attainment 0.00 < 0.9" in decode.reason
    assert patches(kube.api, "pdorch-decode") == [] and directory.draining == set()

    # Once the misses are older than the window and requests meet the target, the pool shrinks.
    time_.now += 61
    for _ in range(10):
        slo.record(ttft_s=0.2, tpot_s=0.05)
    await scaler.step()
    assert patches(kube.api, "pdorch-decode") == [1]
