"""The same-host KV path over real sockets and real processes: shared rings instead of the socket,
chosen by host identity or forced, verified like the socket path, leaving nothing behind a crash."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.asyncio

from tests.support.kv import make_layers, p2p, send_all, wait_until
from tests.support.same_host import (
    WAIT_S,
    dev_shm,
    kill,
    line_from,
    peer,
    rings_mapped,
    rings_open,
    scribble_over_rings,
)
from tests.support.same_host_peer import NUM_LAYERS, ROW_SHAPE, ROWS, kv_layers
from tests.support.security import INSECURE
from transport.codec import Decoder, Encoder
from transport.errors import ErrorCode, PdorchError
from transport.kv import ArraySink, KvReceiver, KvSender
from transport.kv.messages import KV_PROTOCOL_VERSION, KvAccept, KvBegin, KvMessage, KvNack
from transport.kv.same_host import SameHostMode, host_identity
from transport.messages import KvMode, KvRoute
from transport.security import Security, SecurityConfig
from transport.security.key_set import KeySet


def sink() -> ArraySink:
    return ArraySink(NUM_LAYERS, ROWS, ROW_SHAPE, "float16")


@pytest.fixture(autouse=True)
def no_ring_of_an_earlier_test() -> None:
    # These tests count the rings this process maps; a ring an earlier test leaked would be counted.
    gc.collect()
    assert rings_mapped() == [], "a shared ring of an earlier test is still mapped in this process"


@pytest.fixture
async def receiver(ctx: zmq.asyncio.Context) -> AsyncIterator[KvReceiver]:
    rx = KvReceiver(ctx, security=INSECURE, bind="tcp://127.0.0.1:0", idle_s=1.0)
    await rx.start()
    yield rx
    await rx.close()


async def test_same_host_and_tcp_hand_over_identical_caches(receiver: KvReceiver) -> None:
    caches = []
    for tid, mode in (("shared", SameHostMode.ON), ("socket", SameHostMode.OFF)):
        proc = peer("send", receiver.endpoint, tid, mode, "5")
        try:
            cache = sink()
            assert await receiver.receive(p2p(tid), cache, deadline_s=WAIT_S) == {"first_token": 1}
            assert await line_from(proc) == "ok"
            caches.append(cache.layers)
        finally:
            proc.kill()
            proc.wait(WAIT_S)
    assert receiver.stats.same_host == 1  # the first went through a ring, the second did not
    assert np.array_equal(caches[0], caches[1])
    assert np.array_equal(caches[0], kv_layers(5))


class _HeldSink(ArraySink):
    """Holds its first write until released, so the test can act while chunks sit in the ring."""

    def __init__(self, num_layers: int = NUM_LAYERS, rows: int = ROWS) -> None:
        super().__init__(num_layers, rows, ROW_SHAPE, "float16")
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, layer: int, row_offset: int, rows: np.ndarray) -> None:
        self.entered.set()
        self.release.wait(WAIT_S)
        super().write(layer, row_offset, rows)


async def test_a_corrupted_ring_is_detected(receiver: KvReceiver) -> None:
    held = _HeldSink()
    proc = peer("send", receiver.endpoint, "t", SameHostMode.ON, "1")
    try:
        receiving = asyncio.create_task(receiver.receive(p2p("t"), held, deadline_s=WAIT_S))
        assert await asyncio.to_thread(held.entered.wait, WAIT_S)
        # The first span of the first chunk is verified; scribble over the whole ring.
        assert scribble_over_rings() == 1
        held.release.set()
        with pytest.raises(PdorchError) as e:
            await receiving
        assert e.value.code == ErrorCode.KV_CORRUPT
        assert await line_from(proc) == "kv_corrupt"
    finally:
        held.release.set()
        proc.kill()
        proc.wait(WAIT_S)


async def test_a_sender_killed_mid_transfer_leaves_nothing(receiver: KvReceiver) -> None:
    proc = peer("send", receiver.endpoint, "t", SameHostMode.ON, "2", "--hold-after", "2")
    try:
        receiving = asyncio.create_task(receiver.receive(p2p("t"), sink(), deadline_s=WAIT_S))
        assert await line_from(proc) == "holding"
        # Both sides map the ring, and neither holds an fd of it: no other process can open it.
        assert rings_mapped(proc.pid) and len(rings_mapped()) == 1
        assert rings_open(proc.pid) == {} and rings_open() == {}
        kill(proc)
        with pytest.raises(PdorchError) as e:
            await receiving  # the sender went quiet (idle_s)
        assert e.value.code == ErrorCode.KV_TRUNCATED
    finally:
        proc.kill()
        proc.wait(WAIT_S)
    assert receiver.stats.shared_rings == 0  # a failed transfer's ring is closed, never lent again
    assert rings_open() == {} and rings_mapped() == []
    assert dev_shm() == set()  # rings are memfds: nothing ever has a name there


async def test_a_receiver_killed_mid_transfer_leaves_nothing(ctx: zmq.asyncio.Context) -> None:
    proc = peer("receive", SameHostMode.ON)
    sender = KvSender(ctx, security=INSECURE, same_host=SameHostMode.ON)
    try:
        endpoint = await line_from(proc)
        layers = kv_layers(3)
        route = KvRoute(KvMode.P2P, endpoint, "t")
        sending = asyncio.create_task(send_all(sender, route, layers, {"first_token": 1}, deadline_s=20))
        assert await line_from(proc) == "writing"
        assert len(rings_mapped()) >= 1 and sender.mapped_rings == 1
        kill(proc)
        with pytest.raises(PdorchError) as e:
            await sending  # no credit comes back: the transfer's deadline ends it
        assert e.value.code == ErrorCode.KV_TIMEOUT
        assert sender.mapped_rings == 0
        assert rings_mapped() == []  # the dead receiver's ring is freed with our mapping
        assert dev_shm() == set()  # rings are memfds: nothing ever has a name there
    finally:
        await sender.close()
        proc.kill()
        proc.wait(WAIT_S)


async def _accept_for(rx: KvReceiver, transfer_id: str, host: str) -> KvAccept:
    """What the receiver answers a raw begin announcing ``host``."""
    expecting = asyncio.create_task(rx.receive(p2p(transfer_id), sink(), deadline_s=WAIT_S))
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(rx.endpoint)
    try:
        begin = KvBegin(
            KV_PROTOCOL_VERSION, transfer_id, NUM_LAYERS, ROWS, list(ROW_SHAPE), "float16", 128, host
        )
        await sock.send_multipart(Encoder().encode(begin))
        reply = Decoder(KvMessage).decode(await asyncio.wait_for(sock.recv_multipart(copy=False), WAIT_S))
        assert isinstance(reply, KvAccept)
        return reply
    finally:
        expecting.cancel()
        await asyncio.gather(expecting, return_exceptions=True)
        sock.close()
        ctx.term()


async def test_a_ring_is_offered_only_to_a_sender_on_this_host(receiver: KvReceiver) -> None:
    assert host_identity()  # Linux: boot id, PID namespace and user are known
    offered = await _accept_for(receiver, "here", host_identity())
    assert offered.ring is not None and offered.ring.pid == os.getpid()
    assert (await _accept_for(receiver, "elsewhere", "another-boot:1:1000")).ring is None
    assert (await _accept_for(receiver, "unasked", "")).ring is None  # the sender has it off


@pytest.mark.parametrize(
    ("sender_mode", "receiver_mode", "shared"),
    [
        (SameHostMode.AUTO, SameHostMode.AUTO, True),
        (SameHostMode.OFF, SameHostMode.AUTO, False),
        (SameHostMode.AUTO, SameHostMode.OFF, False),
    ],
)
async def test_modes_choose_the_path(
    ctx: zmq.asyncio.Context, sender_mode: SameHostMode, receiver_mode: SameHostMode, shared: bool
) -> None:
    rx = KvReceiver(ctx, security=INSECURE, bind="tcp://127.0.0.1:0", same_host=receiver_mode)
    await rx.start()
    tx = KvSender(ctx, security=INSECURE, same_host=sender_mode)
    try:
        layers = make_layers(2, 300, (2, 8, 128), "float16", seed=4)
        cache = ArraySink(2, 300, (2, 8, 128), "float16")
        receiving = asyncio.create_task(rx.receive(p2p("t"), cache, deadline_s=WAIT_S))
        await send_all(tx, KvRoute(KvMode.P2P, rx.endpoint, "t"), layers, {"first_token": 1}, WAIT_S)
        assert await receiving == {"first_token": 1}
        assert np.array_equal(cache.layers, layers)
        assert (rx.stats.same_host, tx.same_host_transfers) == ((1, 1) if shared else (0, 0))
    finally:
        await tx.close()
        await rx.close()


async def test_forced_on_fails_when_the_receiver_offers_no_ring(ctx: zmq.asyncio.Context) -> None:
    rx = KvReceiver(ctx, security=INSECURE, bind="tcp://127.0.0.1:0", same_host=SameHostMode.OFF)
    await rx.start()
    tx = KvSender(ctx, security=INSECURE, same_host=SameHostMode.ON)
    try:
        layers = make_layers(1, 64, (2, 8, 128), "float16")
        receiving = asyncio.create_task(
            rx.receive(p2p("t"), ArraySink(1, 64, (2, 8, 128), "float16"), deadline_s=WAIT_S)
        )
        with pytest.raises(PdorchError) as sent:
            await send_all(tx, KvRoute(KvMode.P2P, rx.endpoint, "t"), layers, {}, WAIT_S)
        assert sent.value.code == ErrorCode.CONFIG
        with pytest.raises(PdorchError) as received:
            await receiving  # told at once (abort), not at its deadline
        assert received.value.code == ErrorCode.KV_TRUNCATED
    finally:
        await tx.close()
        await rx.close()


async def test_a_ring_is_lent_again_only_to_its_sender(
    receiver: KvReceiver, ctx: zmq.asyncio.Context
) -> None:
    layers = make_layers(2, 300, (2, 8, 128), "float16", seed=6)
    senders = [KvSender(ctx, security=INSECURE, same_host=SameHostMode.ON) for _ in range(2)]
    try:
        for i, tx in enumerate([senders[0], senders[0], senders[1]]):
            cache = ArraySink(2, 300, (2, 8, 128), "float16")
            receiving = asyncio.create_task(receiver.receive(p2p(f"t{i}"), cache, deadline_s=WAIT_S))
            await send_all(tx, KvRoute(KvMode.P2P, receiver.endpoint, f"t{i}"), layers, {}, WAIT_S)
            await receiving
            assert np.array_equal(cache.layers, layers)
        # The first sender's two transfers shared one ring; the second sender got its own.
        assert receiver.stats.same_host == 3 and receiver.stats.shared_rings == 2
        assert [tx.mapped_rings for tx in senders] == [1, 1]
    finally:
        for tx in senders:
            await tx.close()
    await wait_until(lambda: len(rings_mapped()) == 2)  # only the receiver's own mappings are left


# ----------------------------------------------------------------------------- with authentication


def _load(keys: KeySet, name: str) -> Security:
    return Security.load(
        SecurityConfig(key_file=str(keys.key_file(name)), trusted_keys=str(keys.trusted_dir))
    )


async def test_rings_are_negotiated_over_curve_and_only_within_the_senders_scope(
    ctx: zmq.asyncio.Context, tmp_path: Path
) -> None:
    keys = KeySet.create(tmp_path / "keys", {"prefill": (), "decode": ()})
    decode, prefill = _load(keys, "decode"), _load(keys, "prefill")
    rx = KvReceiver(ctx, security=decode, bind="tcp://127.0.0.1:0", same_host=SameHostMode.ON)
    await rx.start()
    tx = KvSender(ctx, security=prefill, same_host=SameHostMode.ON)
    server_key = keys.public_key("decode")
    try:
        layers = make_layers(2, 300, (2, 8, 128), "float16", seed=8)
        cache = ArraySink(2, 300, (2, 8, 128), "float16")
        receiving = asyncio.create_task(rx.receive(p2p("prefill/t"), cache, deadline_s=WAIT_S))
        route = KvRoute(KvMode.P2P, rx.endpoint, "prefill/t", server_key)
        await send_all(tx, route, layers, {"first_token": 1}, WAIT_S)
        assert await receiving == {"first_token": 1}
        assert np.array_equal(cache.layers, layers)
        assert (rx.stats.same_host, tx.same_host_transfers) == (1, 1)
        # A transfer named in another key's scope is refused at its begin: no ring is lent for it.
        receiving = asyncio.create_task(rx.receive(p2p("decode/t"), sink(), deadline_s=1.0))
        with pytest.raises(PdorchError) as sent:
            await send_all(tx, KvRoute(KvMode.P2P, rx.endpoint, "decode/t", server_key), layers, {}, WAIT_S)
        assert sent.value.code == ErrorCode.KV_REJECTED
        with pytest.raises(PdorchError):
            await receiving
        assert rx.stats.same_host == 1 and rx.stats.refused_begins == 1
    finally:
        await tx.close()
        await rx.close()
        decode.close()
        prefill.close()


async def test_same_host_begins_count_against_the_per_peer_bound(ctx: zmq.asyncio.Context) -> None:
    rx = KvReceiver(
        ctx, security=INSECURE, bind="tcp://127.0.0.1:0", same_host=SameHostMode.ON, max_parked_per_peer=1
    )
    await rx.start()
    peer_ctx = zmq.asyncio.Context()
    sock = peer_ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(rx.endpoint)
    try:
        for tid in ("a", "b"):  # nobody expects either: the first waits, the second is one too many
            begin = KvBegin(
                KV_PROTOCOL_VERSION, tid, NUM_LAYERS, ROWS, list(ROW_SHAPE), "float16", 128, host_identity()
            )
            await sock.send_multipart(Encoder().encode(begin))
        reply = Decoder(KvMessage).decode(await asyncio.wait_for(sock.recv_multipart(copy=False), WAIT_S))
        assert isinstance(reply, KvNack) and reply.transfer_id == "b"
        assert reply.code == ErrorCode.KV_REJECTED and "this peer" in reply.message
        assert rx.stats.parked == 1 and rx.stats.shared_rings == 0  # no ring before acceptance
    finally:
        sock.close()
        peer_ctx.term()
        await rx.close()


async def test_a_ring_lent_again_before_its_sender_saw_the_ack_is_still_used(
    receiver: KvReceiver, ctx: zmq.asyncio.Context
) -> None:
    """Many transfers at once from one sender, forced through shared memory: the receiver lends a
    ring again as soon as its transfer settled, which can be before the sender's stream has read
    the ack and let go of it. The sender must write the new transfer into that same mapping (the
    ring is sealed: it cannot be mapped again), not fail it."""
    layers = make_layers(1, 16, (2, 8, 128), "float16", seed=9)
    tx = KvSender(ctx, security=INSECURE, same_host=SameHostMode.ON)

    async def one(i: int) -> None:
        cache = ArraySink(1, 16, (2, 8, 128), "float16")
        receiving = asyncio.create_task(receiver.receive(p2p(f"c{i}"), cache, deadline_s=WAIT_S))
        await send_all(tx, KvRoute(KvMode.P2P, receiver.endpoint, f"c{i}"), layers, {}, WAIT_S)
        await receiving
        assert np.array_equal(cache.layers, layers)

    try:
        for _ in range(5):
            await asyncio.gather(*(one(i) for i in range(24)))
        assert receiver.stats.same_host == 120
    finally:
        await tx.close()


async def test_small_chunks_are_packed_into_the_ring(receiver: KvReceiver, ctx: zmq.asyncio.Context) -> None:
    """A short prompt's layers are small chunks: each takes its own bytes of the ring, not a whole
    slot, so the sender writes all 32 while the receiver has not emptied the first (one per slot,
    it would stop at the ring's 4 slots and wait a round trip for credit every few chunks)."""
    layers = make_layers(32, 16, ROW_SHAPE, "float16", seed=11)  # a short prompt: 64 KiB a layer
    held = _HeldSink(32, 16)
    tx = KvSender(ctx, security=INSECURE, same_host=SameHostMode.ON)
    try:
        receiving = asyncio.create_task(receiver.receive(p2p("small"), held, deadline_s=WAIT_S))
        stream = await tx.open(
            KvRoute(KvMode.P2P, receiver.endpoint, "small"),
            num_layers=32,
            rows_per_layer=16,
            row_shape=ROW_SHAPE,
            dtype="float16",
            deadline_s=WAIT_S,
        )
        for layer in range(32):
            await stream.send_layer(layer, layers[layer])
        # No credit came back: the receiver holds (or has yet to reach) its first write.
        assert await asyncio.to_thread(held.entered.wait, WAIT_S)
        assert stream.used_ring and stream.bytes_sent == layers.nbytes
        assert stream.peak_in_flight == layers.nbytes  # charged its bytes, nothing more
        held.release.set()
        await stream.finish({})
        await receiving
        assert np.array_equal(held.layers, layers)
    finally:
        held.release.set()
        await tx.close()
