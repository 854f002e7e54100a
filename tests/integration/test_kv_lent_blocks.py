"""The same-host KV path into lent blocks, over real sockets and real processes: a sender on this
host writes every row straight into the receiver's blocks (the receiver copies nothing), verified
like the socket path, and a crash of either side leaves nothing mapped or named."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator

import numpy as np
import pytest
import zmq.asyncio

from tests.support.kv import p2p, send_all
from tests.support.same_host import WAIT_S, blocks_mapped, dev_shm, kill, line_from, peer, rings_mapped
from tests.support.same_host_peer import NUM_LAYERS, ROW_SHAPE, ROWS, kv_layers
from tests.support.security import INSECURE
from transport.errors import ErrorCode, PdorchError
from transport.kv import ArraySink, KvReceiver, KvSender
from transport.kv.pool_sink import PoolSink
from transport.kv.same_host import SameHostMode
from transport.kv.same_host.mapped_blocks import MappedBlocks
from transport.messages import KvMode, KvRoute

BLOCKS = ROWS // 16  # the peer's transfer in blocks of 16 rows


def pool_sink() -> PoolSink:
    return PoolSink(NUM_LAYERS, ROWS, ROW_SHAPE, "float16")


@pytest.fixture(autouse=True)
def nothing_of_an_earlier_test() -> None:
    gc.collect()
    assert blocks_mapped() == [] and rings_mapped() == [], "an earlier test left shared KV mapped"


@pytest.fixture
async def receiver(ctx: zmq.asyncio.Context) -> AsyncIterator[KvReceiver]:
    rx = KvReceiver(ctx, security=INSECURE, bind="tcp://127.0.0.1:0", idle_s=1.0)
    await rx.start()
    yield rx
    await rx.close()


async def test_lent_blocks_and_tcp_hand_over_identical_caches(receiver: KvReceiver) -> None:
    lent, copied = pool_sink(), ArraySink(NUM_LAYERS, ROWS, ROW_SHAPE, "float16")
    try:
        for tid, mode, cache in (("shared", SameHostMode.ON, lent), ("socket", SameHostMode.OFF, copied)):
            proc = peer("send", receiver.endpoint, tid, mode, "5")
            try:
                assert await receiver.receive(p2p(tid), cache, deadline_s=WAIT_S) == {"first_token": 1}
                assert await line_from(proc) == "ok"
            finally:
                proc.kill()
                proc.wait(WAIT_S)
        # The sender wrote the rows into the lent blocks: the receiver copied none of them.
        assert lent.lent == 1 and lent.bytes_written == 0 and receiver.stats.same_host == 1
        assert np.array_equal(lent.layers, copied.layers)
        assert np.array_equal(lent.layers, kv_layers(5))
    finally:
        lent.close()


async def test_a_corrupted_block_is_detected(
    receiver: KvReceiver, ctx: zmq.asyncio.Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    write = MappedBlocks.write

    def write_then_damage(
        self: MappedBlocks, layer: int, row_offset: int, rows: np.ndarray, per: int
    ) -> list[int]:
        digests = write(self, layer, row_offset, rows, per)
        if layer == 1:  # a bit flips in the block after the sender hashed the rows
            assert self._rows is not None
            _, piece = next(self._rows.pieces(layer, row_offset + len(rows) - 1, 1))
            piece[7] ^= 0x10
        return digests

    monkeypatch.setattr(MappedBlocks, "write", write_then_damage)
    sink = pool_sink()
    sender = KvSender(ctx, security=INSECURE, same_host=SameHostMode.ON)
    try:
        route = KvRoute(KvMode.P2P, receiver.endpoint, "t")
        receiving = asyncio.create_task(receiver.receive(p2p("t"), sink, deadline_s=WAIT_S))
        with pytest.raises(PdorchError) as sent:
            await send_all(sender, route, kv_layers(1), {"first_token": 1}, deadline_s=WAIT_S)
        with pytest.raises(PdorchError) as received:
            await receiving
        assert received.value.code == sent.value.code == ErrorCode.KV_CORRUPT
        assert "checksum mismatch" in received.value.message
        # The sender unmapped the blocks; what this process still maps is the sink's own pool.
        assert sender.mapped_rings == 0 and len(blocks_mapped()) == BLOCKS
    finally:
        await sender.close()
        sink.close()


async def test_a_sender_killed_mid_transfer_leaves_nothing(receiver: KvReceiver) -> None:
    sink = pool_sink()
    proc = peer("send", receiver.endpoint, "t", SameHostMode.ON, "2", "--hold-after", "2")
    try:
        receiving = asyncio.create_task(receiver.receive(p2p("t"), sink, deadline_s=WAIT_S))
        assert await line_from(proc) == "holding"
        # The sender maps exactly the transfer's blocks, each alone, and holds no fd of them.
        assert len(blocks_mapped(proc.pid)) == BLOCKS
        kill(proc)
        with pytest.raises(PdorchError) as e:
            await receiving  # the sender went quiet (idle_s)
        assert e.value.code == ErrorCode.KV_TRUNCATED
    finally:
        proc.kill()
        proc.wait(WAIT_S)
        sink.close()
    gc.collect()
    assert blocks_mapped() == [] and dev_shm() == set()  # memfds: nothing ever has a name there


async def test_a_receiver_killed_mid_transfer_leaves_nothing(ctx: zmq.asyncio.Context) -> None:
    proc = peer("receive", SameHostMode.ON, "--blocks")
    sender = KvSender(ctx, security=INSECURE, same_host=SameHostMode.ON)
    try:
        endpoint = await line_from(proc)
        route = KvRoute(KvMode.P2P, endpoint, "t")
        sending = asyncio.create_task(send_all(sender, route, kv_layers(3), {"first_token": 1}, deadline_s=5))
        assert await line_from(proc) == "writing"
        assert len(blocks_mapped()) == BLOCKS and sender.mapped_rings == 1
        kill(proc)
        with pytest.raises(PdorchError) as e:
            await sending  # no verdict comes: the transfer's deadline ends it
        assert e.value.code == ErrorCode.KV_TIMEOUT
        assert sender.mapped_rings == 0
        assert blocks_mapped() == []  # the dead receiver's blocks are freed with our mapping
        assert dev_shm() == set()
    finally:
        await sender.close()
        proc.kill()
        proc.wait(WAIT_S)


async def test_a_sender_that_cannot_map_the_blocks_falls_back_to_the_socket(
    receiver: KvReceiver, ctx: zmq.asyncio.Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object) -> MappedBlocks:
        raise PdorchError(ErrorCode.CONFIG, "cannot open the receiver's shared KV block: test")

    monkeypatch.setattr(MappedBlocks, "attach", refuse)
    sink = pool_sink()
    sender = KvSender(ctx, security=INSECURE, same_host=SameHostMode.AUTO)
    try:
        route = KvRoute(KvMode.P2P, receiver.endpoint, "t")
        receiving = asyncio.create_task(receiver.receive(p2p("t"), sink, deadline_s=WAIT_S))
        await send_all(sender, route, kv_layers(4), {"first_token": 1}, deadline_s=WAIT_S)
        assert await receiving == {"first_token": 1}
        assert sink.lent == 1 and sink.bytes_written == kv_layers(4).nbytes  # all of it copied in
        assert np.array_equal(sink.layers, kv_layers(4))
    finally:
        await sender.close()
        sink.close()


async def test_a_transfer_far_larger_than_the_senders_window_goes_into_lent_blocks(
    receiver: KvReceiver, ctx: zmq.asyncio.Context
) -> None:
    # Lent blocks buffer nothing on the way: the sender's bound on bytes in flight (1 MiB here,
    # against a 32 MiB transfer) must not hold it back waiting for credit that never comes.
    sink = pool_sink()
    sender = KvSender(ctx, security=INSECURE, same_host=SameHostMode.ON, window_bytes=1 << 20)
    try:
        route = KvRoute(KvMode.P2P, receiver.endpoint, "t")
        receiving = asyncio.create_task(receiver.receive(p2p("t"), sink, deadline_s=WAIT_S))
        await send_all(sender, route, kv_layers(6), {"first_token": 1}, deadline_s=WAIT_S)
        assert await receiving == {"first_token": 1}
        assert sink.lent == 1 and sink.bytes_written == 0
        assert np.array_equal(sink.layers, kv_layers(6))
    finally:
        await sender.close()
        sink.close()
