"""A decode worker cut off from the network mid-stream is as dead as a killed one.

The worker runs in a network namespace of its own, joined to the host by a veth pair the test
makes; the test takes the link down while the worker streams tokens. No connection is closed (no
RST, no FIN): the scheduler notices only that the worker went silent, drops it after its heartbeat
liveness, and the requests move on to the other decode worker. Every client gets the colocated
output, token for token. Needs root and iproute2; skipped, saying so, where those are missing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from pdorch.launcher import ClusterSpec, LocalCluster, free_port
from tests.e2e.helpers import eventually, generate, metric
from tests.e2e.test_migration import _bodies
from workers.models.catalog import RANDOM_MODEL

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Namespace:
    """A network namespace joined to the host by ``links`` veth pairs, each its own /30 subnet (so a
    process in it can be reached on one link while another is down)."""

    def __init__(self, links: int = 1) -> None:
        tag = os.getpid() % 100_000
        self.name = f"pdorch-cut-{tag}"
        self.veths = [(f"pdh{tag}{'k' * i}", f"pdn{tag}{'k' * i}") for i in range(links)]
        subnets = [f"10.{231 + i}.{tag % 250}" for i in range(links)]
        self.ips = [(f"{net}.1", f"{net}.2") for net in subnets]
        self.host_veth, self.ns_veth = self.veths[0]
        self.host_ip, self.ns_ip = self.ips[0]

    def create(self) -> None:
        _ip("netns", "add", self.name)
        _ip("netns", "exec", self.name, "ip", "link", "set", "lo", "up")
        for (host_veth, ns_veth), (host_ip, ns_ip) in zip(self.veths, self.ips, strict=True):
            _ip("link", "add", host_veth, "type", "veth", "peer", "name", ns_veth)
            _ip("link", "set", ns_veth, "netns", self.name)
            _ip("addr", "add", f"{host_ip}/30", "dev", host_veth)
            _ip("link", "set", host_veth, "up")
            for cmd in (("addr", "add", f"{ns_ip}/30", "dev", ns_veth), ("link", "set", ns_veth, "up")):
                _ip("netns", "exec", self.name, "ip", *cmd)

    def cut(self, down: bool, link: int = 0) -> None:
        _ip("link", "set", self.veths[link][0], "down" if down else "up")

    def delete(self) -> None:
        for host_veth, _ in self.veths:
            subprocess.run(["ip", "link", "del", host_veth], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)


def make_namespace(links: int = 1) -> Iterator[Namespace]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("a network partition test needs root and iproute2 (`ip netns`)")
    ns = Namespace(links)
    try:
        ns.create()
    except subprocess.CalledProcessError as e:
        ns.delete()
        pytest.skip(f"cannot make a network namespace here: {e.stderr.decode(errors='replace').strip()}")
    yield ns
    ns.delete()


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    yield from make_namespace()


@pytest.fixture
def cluster(tmp_path: Path, namespace: Namespace) -> Iterator[LocalCluster]:
    spec = ClusterSpec(prefill=1, decode=1, port=0, log_dir=tmp_path, log_level="WARNING", model=RANDOM_MODEL)
    c = LocalCluster(spec)
    # The scheduler listens on every address, so the namespaced worker reaches it over the veth.
    spec.scheduler_args = ["--control-bind", f"tcp://0.0.0.0:{spec.control_port}"]
    try:
        c.start(timeout_s=90)
        argv = ["ip", "netns", "exec", namespace.name, sys.executable, "-m", "pdorch", "worker"]
        argv += ["--scheduler", f"tcp://{namespace.host_ip}:{spec.control_port}", "--role", "decode"]
        argv += ["--worker-id", "decode-cut", "--kv-bind", f"tcp://{namespace.ns_ip}:{free_port()}"]
        env = {**c.party_env("decode-cut"), "PYTHONPATH": str(REPO)}
        c.spawn("decode-cut", [*argv, "--log-level", "WARNING"], env)
        c.wait_ready(3, 60)
    except BaseException:
        c.stop()
        raise
    yield c
    namespace.cut(down=False)
    c.stop()


async def test_a_decode_worker_cut_off_mid_stream(
    cluster: LocalCluster, colocated: LocalCluster, namespace: Namespace
) -> None:
    bodies = [{**b, "stream": True} for b in _bodies(seed=7, count=6, prompt_len=30, max_tokens=400)]
    timeout = aiohttp.ClientTimeout(total=180)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        want = await asyncio.gather(*(generate(s, colocated.url, b) for b in bodies))
        seen: list[list[int]] = [[] for _ in bodies]
        running = asyncio.gather(*(generate(s, cluster.url, b, seen[i]) for i, b in enumerate(bodies)))

        def cut_worker_streaming() -> bool:
            workers = {w["worker_id"]: w for w in cluster.cluster_state()["workers"]}
            busy = workers.get("decode-cut", {}).get("inflight_requests", 0) >= 1
            return busy and all(len(t) >= 5 for t in seen)

        await eventually(cut_worker_streaming, 60, "the namespaced worker streaming")
        namespace.cut(down=True)
        assert await running == want
        assert "decode-cut" not in {w["worker_id"] for w in cluster.cluster_state()["workers"]}
        assert await metric(s, cluster.url, "pdorch_migrations_total", phase="decode", cause="lost") >= 1
