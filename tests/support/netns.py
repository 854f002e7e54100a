"""Network namespaces for partition tests: a worker in a namespace of its own, joined to the host by
veth pairs the test can take down (no connection is closed: packets just stop). Needs root and
iproute2; the fixture skips, saying so, where those are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdorch.launcher import ClusterSpec, LocalCluster, free_port
from workers.models.catalog import RANDOM_MODEL

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

    def throttle(self, rate_bits_per_s: int, link: int = 0) -> None:
        """Let the host send over ``link`` (into the namespace) at most this fast (a token bucket
        whose queue holds 8 MB: what waits is delayed, not dropped, so the link is slow but steady);
        0: as fast as it can. Skips the test, saying so, where ``tc`` is missing."""
        if shutil.which("tc") is None:
            pytest.skip("a throttled-link test needs tc (iproute2)")
        dev = self.veths[link][0]
        subprocess.run(["tc", "qdisc", "del", "dev", dev, "root"], capture_output=True, timeout=10)
        if rate_bits_per_s:
            limit = ["rate", f"{rate_bits_per_s}bit", "burst", "16kb", "limit", "8mb"]
            subprocess.run(["tc", "qdisc", "add", "dev", dev, "root", "tbf", *limit], check=True, timeout=10)

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


def namespaced_cluster(
    tmp_path: Path,
    ns: Namespace,
    *,
    role: str = "decode",
    prefill: int = 1,
    decode: int,
    kv_link: int = 0,
    decode_links: tuple[int, ...] = (),
    scheduler_args: tuple[str, ...] = (),
) -> Iterator[LocalCluster]:
    """A cluster of ``prefill`` prefill and ``decode`` decode workers on the host, plus the worker
    ``{role}-cut`` in ``ns``: its control connection over the namespace's first link, its KV
    endpoint on link ``kv_link``. The host's decode workers listen for KV on the host's end of that
    link (decode worker ``i`` on link ``decode_links[i]`` if given), so the namespaced worker
    reaches theirs only over it (the host's own workers reach them whatever the link's state: the
    address is local). The links are up again before the cluster stops."""
    _, kv_ip = ns.ips[kv_link]
    links = decode_links or (kv_link,) * decode
    per_worker = {f"decode-{i}": ["--kv-bind", f"tcp://{ns.ips[links[i]][0]}:0"] for i in range(decode)}
    spec = ClusterSpec(
        prefill=prefill,
        decode=decode,
        port=0,
        log_dir=tmp_path,
        log_level="WARNING",
        model=RANDOM_MODEL,
        per_worker_args=per_worker,
    )
    c = LocalCluster(spec)
    # The scheduler listens on every address, so the namespaced worker reaches it over a veth.
    spec.scheduler_args = ["--control-bind", f"tcp://0.0.0.0:{spec.control_port}", *scheduler_args]
    control_host, _ = ns.ips[0]
    name = f"{role}-cut"
    try:
        c.start(timeout_s=90)
        argv = ["ip", "netns", "exec", ns.name, sys.executable, "-m", "pdorch", "worker"]
        argv += ["--scheduler", f"tcp://{control_host}:{spec.control_port}", "--role", role]
        argv += ["--worker-id", name, "--kv-bind", f"tcp://{kv_ip}:{free_port()}"]
        env = {**c.party_env(name), "PYTHONPATH": str(REPO)}
        c.spawn(name, [*argv, "--log-level", "WARNING"], env)
        c.wait_ready(prefill + decode + 1, 60)
    except BaseException:
        c.stop()
        raise
    yield c
    for link in range(len(ns.veths)):
        ns.cut(down=False, link=link)
    c.stop()
