"""Hostile peers on the KV plane, replayed against real processes while legitimate clients are
served: every one of their requests must succeed while the attack runs.

Each attack comes twice: from a stranger (no trusted key: nothing it sends is acted on, the
handshake never completes) and from an insider holding a trusted worker key (its share is bounded
and released in seconds).

1. ``KvBegin`` floods to a decode worker's p2p KV endpoint, with ids nobody expects.
2. ``KvBegin`` to the KV broker that reserve its bytes and never send a chunk.
3. ``KvFetch`` floods to the broker, each asking to wait for weeks.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import zmq

from pdorch.launcher import LocalCluster
from tests.e2e.conftest import start_cluster
from tests.e2e.helpers import complete, metric
from tests.support.security import party
from transport import sockets
from transport.codec import Decoder, Encoder
from transport.kv.checksum import checksum_rows_for
from transport.kv.messages import KV_PROTOCOL_VERSION, KvBegin, KvFetch, KvMessage, KvNack
from transport.security import NO_CLIENT_AUTH, ClientAuth, Plane
from transport.security.keys import read_public

pytestmark = pytest.mark.e2e

ROW_SHAPE = [2, 8, 128]  # fp16: 4 KiB a row
ROW_BYTES = 4096
MIB = 1024 * 1024


def begin(tid: str, rows: int = 16, layers: int = 4) -> KvBegin:
    return KvBegin(KV_PROTOCOL_VERSION, tid, layers, rows, ROW_SHAPE, "float16", checksum_rows_for(ROW_BYTES))


class Peer:
    """A raw KV-plane client: sends what it likes, collects what it is answered."""

    def __init__(self, endpoint: str, auth: ClientAuth) -> None:
        self.sock = sockets.dealer(zmq.Context.instance(), endpoint, auth=auth)
        self._enc = Encoder()
        self._dec: Decoder[KvMessage] = Decoder(KvMessage)
        self.nacks: list[KvNack] = []
        self.stalled = False  # its queue stayed full: nothing it sends goes anywhere

    def send(self, msg: KvMessage) -> None:
        """Queue it; a connection whose handshake never completes takes a queue's worth, then
        nothing more (what it cannot queue is dropped here, as an attacker would move on)."""
        if self.stalled:
            return
        try:
            self.sock.send_multipart(self._enc.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            if not self.sock.poll(5000, zmq.POLLOUT):
                self.stalled = True
                return
            self.sock.send_multipart(self._enc.encode(msg), zmq.NOBLOCK)

    def drain(self, wait_s: float) -> list[KvNack]:
        """Every answer so far: those already there, and those arriving within ``wait_s``."""
        deadline = time.monotonic() + wait_s
        while True:
            self._read()
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                return self.nacks

    def _read(self) -> None:
        while self.sock.poll(0):
            msg = self._dec.decode(self.sock.recv_multipart())
            if isinstance(msg, KvNack):
                self.nacks.append(msg)

    def close(self) -> None:
        self.sock.close(linger=0)


def insider(cluster: LocalCluster, server: str, name: str = "mallory") -> ClientAuth:
    """A worker key the cluster trusts (a compromised worker), pinning ``server``'s key."""
    keys = party(cluster, name)
    return keys.client(Plane.KV, read_public(cluster.keys.trusted_dir / f"{server}.pub").public)


async def legitimate(cluster: LocalCluster, count: int, max_tokens: int = 8) -> list[dict]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as s:
        return await asyncio.gather(
            *(
                complete(s, cluster.url, prompt=f"legit {i} " * 20, max_tokens=max_tokens, temperature=0)
                for i in range(count)
            )
        )


def workers(cluster: LocalCluster) -> dict[str, dict]:
    return {w["worker_id"]: w for w in cluster.cluster_state()["workers"]}


# ------------------------------------------------------------------------------- 1. p2p begin flood


@pytest.fixture
def two_decoders(tmp_path: Path) -> Iterator[LocalCluster]:
    cluster = start_cluster(tmp_path, kv_mode="p2p", prefill=1, decode=2)
    yield cluster
    cluster.stop()


async def test_begins_without_a_key_are_never_acted_on(two_decoders: LocalCluster) -> None:
    target = workers(two_decoders)["decode-0"]["kv_endpoint"]
    stranger = Peer(target, NO_CLIENT_AUTH)
    try:
        for _ in range(300):
            stranger.send(begin(uuid.uuid4().hex))
        results = await legitimate(two_decoders, 16)
        assert all(r["choices"][0]["token_ids"] for r in results)
        assert stranger.drain(1.0) == []  # not even refused: nothing got past the handshake
        assert not workers(two_decoders)["decode-0"]["kv_refusing"]
    finally:
        stranger.close()


async def test_insiders_cannot_take_the_slots_of_others(two_decoders: LocalCluster) -> None:
    """Trusted keys flood begins with ids nobody expects. One connection keeps at most its share,
    one key (its scope) at most its own, whatever its connections; several keys together fill the
    endpoint's slots for begins nobody expects, which makes it 'refusing': placement leaves
    decode-0 out until that passes. Expected transfers are never refused for room, and every
    legitimate request succeeds throughout."""
    cluster = two_decoders
    target = workers(cluster)["decode-0"]["kv_endpoint"]
    auth = insider(cluster, "decode-0")
    one = Peer(target, auth)
    try:
        for _ in range(40):
            one.send(begin(f"mallory/{uuid.uuid4().hex}"))
        nacks = one.drain(2.0)
        assert len(nacks) == 40 - 32 and all("from this peer" in n.message for n in nacks)
        # Another worker's scope is not its to use.
        one.send(begin(f"prefill-0/{uuid.uuid4().hex}"))
        assert any("scope" in n.message for n in one.drain(2.0))
    finally:
        one.close()

    # One key, many connections: its scope's share (128), not the endpoint's 256 slots. The first
    # connection's 32 begins still wait (until park_s), closed or not: they count in the share.
    many = [Peer(target, auth) for _ in range(8)]
    try:
        for peer in many:
            for _ in range(32):
                peer.send(begin(f"mallory/{uuid.uuid4().hex}"))
        refused = [n for peer in many for n in peer.drain(1.0)]
        assert len(refused) == 8 * 32 - (128 - 32) and all("from mallory" in n.message for n in refused)
        assert not workers(cluster)["decode-0"]["kv_refusing"]
    finally:
        for peer in many:
            peer.close()

    names = ["mallory-0", "mallory-1", "mallory-2"]
    peers = [(name, Peer(target, insider(cluster, "decode-0", name))) for name in names for _ in range(4)]

    async def flood(stop: asyncio.Event) -> None:
        while not stop.is_set():
            for name, peer in peers:
                for _ in range(40):
                    peer.send(begin(f"{name}/{uuid.uuid4().hex}"))
            await asyncio.sleep(0.5)

    stop = asyncio.Event()
    flooding = asyncio.create_task(flood(stop))
    try:
        deadline = time.monotonic() + 20
        while not workers(cluster)["decode-0"]["kv_refusing"]:
            assert time.monotonic() < deadline, "decode-0 never showed as refusing"
            await asyncio.sleep(0.1)
        serving = asyncio.create_task(legitimate(cluster, 12, max_tokens=48))
        while not serving.done():
            state = workers(cluster)
            if state["decode-0"]["kv_refusing"]:
                assert state["decode-0"]["inflight_requests"] == 0, "placed on a refusing worker"
            await asyncio.sleep(0.05)
        assert all(len(r["choices"][0]["token_ids"]) == 48 for r in await serving)
        assert any(n.message == "too many transfers waiting" for _, p in peers for n in p.drain(0.5))
    finally:
        stop.set()
        await flooding
        for _, peer in peers:
            peer.close()
    # Once the flood stops, it recovers by itself and takes work again.
    deadline = time.monotonic() + 20
    while workers(cluster)["decode-0"]["kv_refusing"]:
        assert time.monotonic() < deadline, "decode-0 stayed refusing after the flood"
        await asyncio.sleep(0.2)
    assert all(r["choices"][0]["token_ids"] for r in await legitimate(cluster, 8))


# ------------------------------------------------------------------------------- 2, 3. the broker

BROKER_CAPACITY_MB = 64
FIRST_CHUNK_S = 2.0
MAX_FETCH_WAIT_S = 2.0


def _broker_cluster(tmp_path: Path, *extra: str) -> LocalCluster:
    # A TTL no test waits for: whatever is released was released by the first-chunk deadline.
    args = [
        "--capacity-mb",
        str(BROKER_CAPACITY_MB),
        "--first-chunk-s",
        str(FIRST_CHUNK_S),
        "--ttl-s",
        "3600",
    ]
    # Every request split, so that every one is a handoff through the attacked broker (the slo
    # handler would run some on one node when the prefill queue is long).
    config = tmp_path / "scheduler.yaml"
    config.write_text("placement: {handler: {type: slo, params: {colocate: false}}}\n")
    return start_cluster(
        tmp_path, kv_mode="centralized", broker_args=[*args, *extra], scheduler_args=["--config", str(config)]
    )


@pytest.fixture
def broker_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    cluster = _broker_cluster(tmp_path)
    yield cluster
    cluster.stop()


@pytest.fixture
def fetch_capped_broker(tmp_path: Path) -> Iterator[LocalCluster]:
    """A fetch may take MAX_FETCH_WAIT_S at most, waiting and streaming included (so a legitimate
    one that takes longer on a loaded machine moves peer to peer: still served)."""
    cluster = _broker_cluster(tmp_path, "--max-fetch-wait-s", str(MAX_FETCH_WAIT_S))
    yield cluster
    cluster.stop()


async def handoffs(cluster: LocalCluster, outcome: str) -> float:
    async with aiohttp.ClientSession() as s:
        return await metric(s, cluster.url, "pdorch_kv_handoffs_total", mode="centralized", outcome=outcome)


async def test_reservations_that_never_send_are_bounded_and_released(broker_cluster: LocalCluster) -> None:
    cluster = broker_cluster
    rows = (BROKER_CAPACITY_MB * MIB // 45) // (4 * ROW_BYTES)  # 45 begins: the whole broker
    stranger = Peer(cluster.broker, NO_CLIENT_AUTH)
    mallory = Peer(cluster.broker, insider(cluster, "kv-broker"))
    ok_before = await handoffs(cluster, "ok")
    try:
        for _ in range(45):
            stranger.send(begin(uuid.uuid4().hex, rows=rows))
            mallory.send(begin(f"mallory/{uuid.uuid4().hex}", rows=rows))
        results = await legitimate(cluster, 16)
        assert all(r["choices"][0]["token_ids"] for r in results)
        # All through the broker, none refused: the insider held at most half of it.
        assert await handoffs(cluster, "ok") - ok_before == 16
        assert await handoffs(cluster, "kv_rejected") == 0
        deadline = time.monotonic() + 60
        while len(mallory.drain(0.5)) < 45:  # each answered: over its share, or freed unsent
            assert time.monotonic() < deadline, f"only {len(mallory.nacks)} of 45 begins answered"
        nacks = mallory.nacks
        over_share = [n for n in nacks if "share" in n.message]
        released = [n for n in nacks if n.code == "kv_timeout" and "no chunk" in n.message]
        assert over_share and len(over_share) + len(released) == 45
        # Never more than its share held: a refusal says what the sender held then. (How many are
        # refused depends on timing: one the broker reaches after the first-chunk deadline of an
        # earlier one finds that one released.)
        for n in over_share:
            held, more, share = map(int, re.findall(r"\d+", n.message))
            assert held <= share < held + more, n.message
        assert stranger.drain(0.2) == []
    finally:
        stranger.close()
        mallory.close()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_fetch_floods_are_capped_and_answered(fetch_capped_broker: LocalCluster) -> None:
    cluster = fetch_capped_broker
    broker_pid = cluster.procs["kv-broker"].pid
    rss_before = _rss_kib(broker_pid)
    stranger = Peer(cluster.broker, NO_CLIENT_AUTH)
    mallory = Peer(cluster.broker, insider(cluster, "kv-broker"))
    fetches = 20_000
    weeks_ms = 24 * 24 * 3600 * 1000  # ~24 days, as asked in the attack
    try:
        for _ in range(fetches):  # it gets a queue's worth out, then nothing (no handshake)
            stranger.send(KvFetch(KV_PROTOCOL_VERSION, uuid.uuid4().hex, weeks_ms))
        started = time.monotonic()
        # The broker drops a control reply to a peer whose queue is full (bounded per peer), and
        # the claim here is that every fetch is answered: mallory keeps at most 500 unanswered (the
        # queues between them hold a few thousand answers, and its own queue never fills), as fast
        # as the broker answers.
        for i in range(fetches):
            while i - len(mallory.nacks) >= 500:
                assert time.monotonic() < started + 60, f"{len(mallory.nacks)} of {i} answered"
                mallory.drain(0.05)
            mallory.send(KvFetch(KV_PROTOCOL_VERSION, uuid.uuid4().hex, weeks_ms))
        assert not mallory.stalled
        serving = asyncio.ensure_future(legitimate(cluster, 16))
        while not serving.done():
            mallory.drain(0)
            await asyncio.sleep(0.05)
        assert all(r["choices"][0]["token_ids"] for r in serving.result())
        deadline = started + MAX_FETCH_WAIT_S + 30
        while len(mallory.drain(0.5)) < fetches:
            assert time.monotonic() < deadline, f"only {len(mallory.nacks)} of {fetches} fetches answered"
        refused = [n for n in mallory.nacks if "too many fetches" in n.message]
        waited = [n for n in mallory.nacks if n.code == "kv_timeout"]
        # Each answered: refused at once beyond its 64 waiting, or after the capped wait (those
        # that waited free their slots for later ones, so more than 64 wait over the flood).
        assert len(waited) + len(refused) == fetches
        assert len(waited) >= 64 and len(refused) > fetches // 2
        assert _rss_kib(broker_pid) - rss_before < 64 * 1024
        assert stranger.drain(0.2) == []
    finally:
        stranger.close()
        mallory.close()


async def test_the_kv_endpoints_bounds_are_the_workers_flags(tmp_path: Path) -> None:
    """``--kv-max-waiting-per-connection 2 --kv-max-waiting 3``: a connection's third begin is
    refused as its own excess, another connection's second as the endpoint's (kv_busy)."""
    args = ["--kv-max-waiting-per-connection", "2", "--kv-max-waiting", "3"]
    cluster = start_cluster(tmp_path, kv_mode="p2p", worker_args=args)
    target = workers(cluster)["decode-0"]["kv_endpoint"]
    first, second = (Peer(target, insider(cluster, "decode-0")) for _ in range(2))
    try:
        for _ in range(3):
            first.send(begin(f"mallory/{uuid.uuid4().hex}"))
        assert [(n.code, n.message) for n in first.drain(2.0)] == [
            ("kv_rejected", "too many transfers waiting from this peer")
        ]
        for _ in range(2):
            second.send(begin(f"mallory/{uuid.uuid4().hex}"))
        assert [(n.code, n.message) for n in second.drain(2.0)] == [("kv_busy", "too many transfers waiting")]
    finally:
        first.close()
        second.close()
        cluster.stop()
