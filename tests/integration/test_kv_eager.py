"""Eager KV transfers (``KvBegin.eager``): a small transfer goes whole without waiting for an accept;
a receiver not ready for it turns it away and the sender begins it again the usual way."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
import zmq
import zmq.asyncio

from tests.support.kv import make_layers, p2p, started_receiver, wait_until
from tests.support.security import INSECURE
from transport.codec import Decoder, Encoder
from transport.errors import ErrorCode, PdorchError
from transport.kv import ArraySink, KvOutStream, KvReceiver, KvSender
from transport.kv.checksum import checksum_rows_for, span_checksums
from transport.kv.messages import (
    EAGER_MAX_BYTES,
    KV_PROTOCOL_VERSION,
    KvAck,
    KvBegin,
    KvChunk,
    KvEnd,
    KvMessage,
    KvNack,
)
from transport.messages import KvMode, KvRoute

DEADLINE_S = 30.0
LAYERS, ROWS, ROW_SHAPE, DTYPE = 2, 20, (4,), "float16"


@pytest.fixture
async def receiver(ctx: zmq.asyncio.Context) -> AsyncIterator[KvReceiver]:
    async with started_receiver(ctx, park_s=5.0) as rx:
        yield rx


@pytest.fixture
async def full_receiver(ctx: zmq.asyncio.Context) -> AsyncIterator[KvReceiver]:
    """No room to hold an eager transfer that must wait."""
    async with started_receiver(ctx, max_eager_held_bytes=0) as rx:
        yield rx


async def _open(sender: KvSender, receiver: KvReceiver, tid: str, layers: np.ndarray) -> KvOutStream:
    return await sender.open(
        KvRoute(KvMode.P2P, receiver.endpoint, tid),
        num_layers=layers.shape[0],
        rows_per_layer=layers.shape[1],
        row_shape=layers.shape[2:],
        dtype=str(layers.dtype),
        deadline_s=DEADLINE_S,
    )


async def _send(sender: KvSender, receiver: KvReceiver, tid: str, layers: np.ndarray) -> bool:
    """Send ``layers`` whole; whether the transfer was still eager when the receiver confirmed it."""
    stream = await _open(sender, receiver, tid, layers)
    for i, rows in enumerate(layers):
        await stream.send_layer(i, rows)
    await stream.finish({"first_token": 7})
    return stream.eager


async def test_a_small_transfer_the_receiver_expects_goes_eagerly(
    sender: KvSender, receiver: KvReceiver
) -> None:
    layers = make_layers(LAYERS, ROWS, ROW_SHAPE, DTYPE)
    sink = ArraySink(LAYERS, ROWS, ROW_SHAPE, DTYPE)
    receiving = asyncio.create_task(receiver.receive(p2p("eager"), sink, deadline_s=DEADLINE_S))
    await wait_until(lambda: receiver.stats.expected == 1)
    assert await _send(sender, receiver, "eager", layers)
    assert await receiving == {"first_token": 7}
    assert np.array_equal(sink.layers, layers)
    assert (receiver.stats.eager, receiver.stats.eager_not_ready) == (1, 0)
    assert sender.eager_transfers == 1


async def test_an_eager_transfer_that_comes_first_waits_with_its_chunks_held(
    sender: KvSender, receiver: KvReceiver
) -> None:
    """The begin (and all after it) comes before the decode side expects the transfer: it waits,
    and is taken with what it holds when expected, with no accept."""
    layers = make_layers(LAYERS, ROWS, ROW_SHAPE, DTYPE, seed=3)
    sending = asyncio.create_task(_send(sender, receiver, "early", layers))
    await wait_until(lambda: receiver.stats.parked == 1)
    sink = ArraySink(LAYERS, ROWS, ROW_SHAPE, DTYPE)
    assert await receiver.receive(p2p("early"), sink, deadline_s=DEADLINE_S) == {"first_token": 7}
    assert await sending
    assert np.array_equal(sink.layers, layers)
    assert (receiver.stats.eager, receiver.stats.eager_not_ready, receiver.stats.parked) == (1, 0, 0)


async def test_an_eager_transfer_with_no_slot_free_waits_its_turn(
    ctx: zmq.asyncio.Context, sender: KvSender, rendezvous_sender: KvSender
) -> None:
    """Expected, but the one slot is taken: it waits, held, until the slot frees."""
    slow = rendezvous_sender
    async with started_receiver(ctx, max_active=1) as rx:
        hold = asyncio.create_task(rx.receive(p2p("hold"), ArraySink(1, 4, (4,), "uint8"), deadline_s=30))
        holding = await slow.open(
            KvRoute(KvMode.P2P, rx.endpoint, "hold"), num_layers=1, rows_per_layer=4, row_shape=(4,),
            dtype="uint8", deadline_s=30,
        )  # fmt: skip
        await wait_until(lambda: rx.stats.active == 1)
        layers = make_layers(LAYERS, ROWS, ROW_SHAPE, DTYPE, seed=5)
        sink = ArraySink(LAYERS, ROWS, ROW_SHAPE, DTYPE)
        waiting = asyncio.create_task(rx.receive(p2p("next"), sink, deadline_s=30))
        await wait_until(lambda: rx.stats.expected == 2)
        sending = asyncio.create_task(_send(sender, rx, "next", layers))
        await wait_until(lambda: rx.stats.parked == 1)
        await holding.send_layer(0, np.ones((4, 4), np.uint8))
        await holding.finish({})
        assert await hold == {}
        assert await waiting == {"first_token": 7}
        assert await sending
        assert np.array_equal(sink.layers, layers)


async def test_an_eager_transfer_with_no_room_to_wait_is_begun_again_the_usual_way(
    sender: KvSender, full_receiver: KvReceiver
) -> None:
    receiver = full_receiver
    layers = make_layers(LAYERS, ROWS, ROW_SHAPE, DTYPE, seed=4)
    sending = asyncio.create_task(_send(sender, receiver, "again", layers))
    await wait_until(lambda: receiver.stats.eager_not_ready == 1 and receiver.stats.parked == 1)
    sink = ArraySink(LAYERS, ROWS, ROW_SHAPE, DTYPE)  # the second begin (not eager) waits, holding nothing
    assert await receiver.receive(p2p("again"), sink, deadline_s=DEADLINE_S) == {"first_token": 7}
    assert not await sending
    assert np.array_equal(sink.layers, layers)
    assert receiver.stats.eager == 0 and sender.eager_transfers == 0


async def test_a_sender_that_gives_up_after_its_eager_begin_was_turned_away_tells_the_receiver(
    sender: KvSender, full_receiver: KvReceiver
) -> None:
    receiver = full_receiver
    layers = make_layers(LAYERS, ROWS, ROW_SHAPE, DTYPE)
    stream = await _open(sender, receiver, "given-up", layers)
    await stream.send_layer(0, layers[0])
    await wait_until(lambda: receiver.stats.eager_not_ready == 1)
    sink = ArraySink(LAYERS, ROWS, ROW_SHAPE, DTYPE)
    receiving = asyncio.create_task(receiver.receive(p2p("given-up"), sink, deadline_s=DEADLINE_S))
    await wait_until(lambda: receiver.stats.expected == 1)
    await stream.abort("prefill stopped")
    with pytest.raises(PdorchError) as info:
        await asyncio.wait_for(receiving, 10)  # told at once, not at its deadline
    assert info.value.code is ErrorCode.KV_TRUNCATED


async def test_a_waiting_eager_transfer_its_sender_aborts_is_forgotten_and_its_decode_job_told(
    sender: KvSender, receiver: KvReceiver
) -> None:
    layers = make_layers(LAYERS, ROWS, ROW_SHAPE, DTYPE)
    stream = await _open(sender, receiver, "quit", layers)
    await stream.send_layer(0, layers[0])
    await wait_until(lambda: receiver.stats.parked == 1)
    await stream.abort("prefill stopped")
    await wait_until(lambda: receiver.stats.parked == 0)
    assert receiver.stats.active == 0
    # Its decode job, coming after, is told at once rather than at its deadline.
    sink = ArraySink(LAYERS, ROWS, ROW_SHAPE, DTYPE)
    with pytest.raises(PdorchError) as info:
        await asyncio.wait_for(receiver.receive(p2p("quit"), sink, deadline_s=DEADLINE_S), 10)
    assert info.value.code is ErrorCode.KV_TRUNCATED and "prefill stopped" in info.value.message


async def test_only_small_p2p_transfers_go_eagerly(ctx: zmq.asyncio.Context, receiver: KvReceiver) -> None:
    row_bytes = 4096
    rows = EAGER_MAX_BYTES // row_bytes + 1  # one row over the bound
    sender = KvSender(ctx, security=INSECURE)
    try:
        big = np.arange(rows * row_bytes, dtype=np.uint8).reshape(1, rows, row_bytes)
        sink = ArraySink(1, rows, (row_bytes,), "uint8")
        receiving = asyncio.create_task(receiver.receive(p2p("big"), sink, deadline_s=DEADLINE_S))
        await wait_until(lambda: receiver.stats.expected == 1)
        assert not await _send(sender, receiver, "big", big)
        await receiving
        assert np.array_equal(sink.layers, big)
        assert receiver.stats.eager == 0
    finally:
        await sender.close()


class _RawPeer:
    """A DEALER speaking the KV protocol by hand to a receiver's endpoint."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self._enc, self._dec = Encoder(), Decoder(KvMessage)

    async def send(self, msg: KvMessage) -> None:
        await self.sock.send_multipart(self._enc.encode(msg), copy=False)

    async def recv(self, timeout_s: float = 10.0) -> KvMessage:
        frames = await asyncio.wait_for(self.sock.recv_multipart(copy=False), timeout_s)
        return self._dec.decode(frames)


def _begin(tid: str, rows: int, row_bytes: int, eager: bool = True) -> KvBegin:
    return KvBegin(
        version=KV_PROTOCOL_VERSION, transfer_id=tid, num_layers=1, rows_per_layer=rows,
        row_shape=[row_bytes], dtype="uint8", checksum_rows=checksum_rows_for(row_bytes), eager=eager,
    )  # fmt: skip


async def test_on_the_wire_an_eager_transfer_is_answered_by_its_verdict_alone(
    ctx: zmq.asyncio.Context, receiver: KvReceiver
) -> None:
    rows = np.arange(64, dtype=np.uint8).reshape(4, 16)
    sink = ArraySink(1, 4, (16,), "uint8")
    receiving = asyncio.create_task(receiver.receive(p2p("wire"), sink, deadline_s=DEADLINE_S))
    await wait_until(lambda: receiver.stats.expected == 1)
    peer = _RawPeer(ctx, receiver.endpoint)
    try:
        begin = _begin("wire", 4, 16)
        await peer.send(begin)
        digests = span_checksums(rows, begin.checksum_rows)
        await peer.send(KvChunk("wire", 0, 0, 0, digests, rows))
        await peer.send(KvEnd("wire", 1, rows.nbytes, [4], {"first_token": 1}))
        assert await peer.recv() == KvAck("wire")  # no accept, no credit: the verdict only
        assert await receiving == {"first_token": 1}
        assert np.array_equal(sink.layers[0], rows)
    finally:
        peer.sock.close()


@pytest.mark.parametrize("extra", ["chunk", "after-end"])
async def test_a_waiting_eager_transfer_that_sends_more_than_it_announced_fails(
    ctx: zmq.asyncio.Context, receiver: KvReceiver, extra: str
) -> None:
    """Held while nobody expects it, it may hold only what its begin announced: its rows, then its end."""
    rows = np.arange(64, dtype=np.uint8).reshape(4, 16)
    peer = _RawPeer(ctx, receiver.endpoint)
    try:
        begin = _begin("greedy", 4, 16)
        await peer.send(begin)
        digests = span_checksums(rows, begin.checksum_rows)
        await peer.send(KvChunk("greedy", 0, 0, 0, digests, rows))
        if extra == "after-end":
            await peer.send(KvEnd("greedy", 1, rows.nbytes, [4], {}))
        await peer.send(KvChunk("greedy", 1, 0, 0, digests, rows[:1]))
        nack = await peer.recv()
        assert isinstance(nack, KvNack) and nack.code == ErrorCode.KV_CORRUPT
        await wait_until(lambda: receiver.stats.parked == 0)
    finally:
        peer.sock.close()


async def test_an_eager_begin_larger_than_the_bound_is_refused(
    ctx: zmq.asyncio.Context, receiver: KvReceiver
) -> None:
    receiving = asyncio.create_task(
        receiver.receive(p2p("huge"), ArraySink(1, 2, (EAGER_MAX_BYTES,), "uint8"), deadline_s=2)
    )
    await wait_until(lambda: receiver.stats.expected == 1)
    peer = _RawPeer(ctx, receiver.endpoint)
    try:
        await peer.send(_begin("huge", 2, EAGER_MAX_BYTES))
        nack = await peer.recv()
        assert isinstance(nack, KvNack) and nack.code == ErrorCode.BAD_MESSAGE
    finally:
        peer.sock.close()
    with pytest.raises(PdorchError):
        await receiving  # the sender never begins again: the decode side waits out its deadline
