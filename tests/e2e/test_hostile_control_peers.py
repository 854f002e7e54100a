"""Hostile peers on the control plane, against a real cluster that keeps serving meanwhile.

- Strangers: no key, an unknown key, a key of another kind, or a replay of a real worker's
  recorded session; none of them gets a single message acted on (no registration, no job).
- Identity takeover: a connection claiming a registered worker's id (with that worker's routing
  id, with a trusted key of its own, even with the worker's own key) is refused and never handed
  the worker's jobs; the worker keeps serving. A restarted worker takes its id back with its key.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import msgspec
import pytest

from pdorch.launcher import LocalCluster
from tests.e2e.conftest import start_cluster
from tests.e2e.helpers import complete, metric
from tests.support.fake_worker import FakeWorker
from transport.messages import DecodeJob, Disconnect, Goodbye, Heartbeat, Welcome
from transport.security import KeyKind, Security, SecurityConfig
from transport.security.key_set import KeySet
from transport.security.keys import read_public

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path / "logs", kv_mode="p2p")
    yield c
    c.stop()


def registered(cluster: LocalCluster) -> set[str]:
    return {w["worker_id"] for w in cluster.cluster_state()["workers"]}


async def serve(cluster: LocalCluster, count: int = 4) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        results = await asyncio.gather(
            *(
                complete(s, cluster.url, prompt=f"still here {i}", max_tokens=8, temperature=0)
                for i in range(count)
            )
        )
    # Served whole: 8 tokens, or fewer ending in EOS.
    assert all(r["choices"][0]["finish_reason"] in ("length", "stop") for r in results)
    assert all(r["choices"][0]["token_ids"] for r in results)


def stranger_keys(tmp_path: Path) -> Security:
    """A well-formed key nobody in the cluster trusts (named like one of its workers)."""
    keys = KeySet.create(tmp_path / "elsewhere", {"decode-0": ()})
    cfg = SecurityConfig(key_file=str(keys.key_file("decode-0")), trusted_keys=str(keys.trusted_dir))
    return Security.load(cfg)


def gets_nothing(worker: FakeWorker) -> bool:
    try:
        worker.register()
    except TimeoutError:
        return True
    return False


async def test_strangers_get_nothing_acted_on(cluster: LocalCluster, tmp_path: Path) -> None:
    pinned = read_public(cluster.keys.trusted_dir / "scheduler.pub").public
    attempts = {
        "no key": FakeWorker(cluster, "intruder-1", security=Security.insecure()),
        "an unknown key": FakeWorker(
            cluster, "intruder-2", security=stranger_keys(tmp_path), server_key=pinned
        ),
    }
    cluster.keys.add("broker-2", KeyKind.KV_BROKER)  # a trusted key, but not a worker's
    broker_keys = Security.load(
        SecurityConfig(
            key_file=str(cluster.keys.key_file("broker-2")), trusted_keys=str(cluster.keys.trusted_dir)
        )
    )
    attempts["a key of another kind"] = FakeWorker(
        cluster, "intruder-3", security=broker_keys, server_key=pinned
    )
    try:
        for what, worker in attempts.items():
            assert gets_nothing(worker), f"{what}: the scheduler answered"
        assert registered(cluster) == {"prefill-0", "decode-0"}
        await serve(cluster)
        async with aiohttp.ClientSession() as s:
            assert await metric(s, cluster.url, "pdorch_zmq_refused_handshakes") >= 2
    finally:
        for worker in attempts.values():
            worker.close()


class Recorder:
    """A TCP relay that records what a client sends, so it can be replayed byte for byte."""

    def __init__(self, target_port: int) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.target_port = target_port
        self.sent: list[bytes] = []
        threading.Thread(target=self._relay, daemon=True).start()

    def _relay(self) -> None:
        client, _ = self.server.accept()
        upstream = socket.create_connection(("127.0.0.1", self.target_port))

        def pipe(src: socket.socket, dst: socket.socket, record: bool) -> None:
            try:
                while data := src.recv(65536):
                    if record:
                        self.sent.append(data)
                    dst.sendall(data)
            except OSError:
                pass
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pipe, args=(upstream, client, False), daemon=True).start()
        pipe(client, upstream, True)


async def test_a_replayed_session_registers_nothing(cluster: LocalCluster) -> None:
    control_port = int(cluster.control.rsplit(":", 1)[1])
    recorder = Recorder(control_port)
    real = FakeWorker(cluster, "recorded", endpoint=f"tcp://127.0.0.1:{recorder.port}")
    try:
        assert isinstance(real.register(), Welcome)
        real.send(Goodbye("done"))
        deadline = time.monotonic() + 10
        while "recorded" in registered(cluster):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        real.close()
    assert recorder.sent, "nothing was recorded"
    # The same bytes again, from a new connection: the handshake's cookie is stale, and nothing
    # after it can be read by the scheduler.
    with socket.create_connection(("127.0.0.1", control_port)) as replay:
        replay.settimeout(0.5)
        for chunk in recorder.sent:
            try:
                replay.sendall(chunk)
                replay.recv(65536)
            except OSError:
                break
    await asyncio.sleep(1.0)
    assert "recorded" not in registered(cluster)
    await serve(cluster)


def jobs_received(worker: FakeWorker, seconds: float) -> list[DecodeJob]:
    jobs: list[DecodeJob] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            msg = worker.recv(0.2)
        except TimeoutError:
            continue
        except Exception:  # whatever it gets that is not a message for it
            continue
        if isinstance(msg, DecodeJob):
            jobs.append(msg)
        elif isinstance(msg, Heartbeat):
            worker.send(Heartbeat(worker.load))
    return jobs


async def test_a_second_connection_cannot_take_a_worker_id(cluster: LocalCluster) -> None:
    takeovers = {
        # The worker's id as routing id (what took a worker's jobs when routing ids were worker
        # ids) and as worker id, with a trusted key of its own.
        "unauthorized": FakeWorker(cluster, "mallory", identity=b"decode-0"),
        # The worker's own key (stolen, or a second process started by mistake).
        "identity_in_use": FakeWorker(cluster, "decode-0"),
    }
    try:
        for code, attacker in takeovers.items():
            attacker.hello = msgspec.structs.replace(attacker.hello, worker_id="decode-0")
            reply = attacker.register()
            assert isinstance(reply, Disconnect) and reply.code == code, reply
        # The real worker keeps its registration and its traffic: requests succeed, and none of
        # their jobs reaches a claimant.
        serving = asyncio.create_task(serve(cluster, 6))
        leaked = await asyncio.gather(*(asyncio.to_thread(jobs_received, a, 6.0) for a in takeovers.values()))
        await serving
        assert leaked == [[], []]
        assert registered(cluster) == {"prefill-0", "decode-0"}
        async with aiohttp.ClientSession() as s:
            assert await metric(s, cluster.url, "pdorch_control_refused_registrations_total") >= 2
    finally:
        for attacker in takeovers.values():
            attacker.close()


async def test_a_restarted_worker_takes_its_id_back(cluster: LocalCluster) -> None:
    cluster.kill("decode-0")
    deadline = time.monotonic() + 30
    while "decode-0" in registered(cluster):  # its connection is gone: dropped
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    cluster.restart("decode-0")
    while "decode-0" not in registered(cluster):  # the same key registers the same id again
        assert time.monotonic() < deadline + 30
        await asyncio.sleep(0.1)
    await serve(cluster)


async def test_a_revoked_key_loses_its_worker(cluster: LocalCluster) -> None:
    extra = FakeWorker(cluster, "to-revoke")
    try:
        assert isinstance(extra.register(), Welcome)
        assert "to-revoke" in registered(cluster)
        extra.send(Heartbeat(extra.load))
        cluster.keys.revoke("to-revoke")
        deadline = time.monotonic() + 10
        while "to-revoke" in registered(cluster):
            assert time.monotonic() < deadline, "a worker whose key was revoked stayed registered"
            extra.send(Heartbeat(extra.load))
            await asyncio.sleep(0.1)
    finally:
        extra.close()
    await serve(cluster)
