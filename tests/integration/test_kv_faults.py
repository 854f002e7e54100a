"""KV-plane failures on real sockets: corrupted, lost and garbage frames, credit overruns.

Faults are injected by a tampering proxy between a real KvSender and a real KvReceiver (so both
sides' reactions are checked), or by a raw DEALER that crafts frames itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest
import zmq
import zmq.asyncio

from tests.support.kv import p2p, started_receiver
from tests.support.security import INSECURE
from transport.codec import MAX_FRAME_BYTES, Decoder, Encoder
from transport.errors import ErrorCode, PdorchError
from transport.kv import KvReceiver, KvSender
from transport.kv.checksum import checksum, checksum_rows_for, span_checksums
from transport.kv.messages import (
    KV_PROTOCOL_VERSION,
    KvAccept,
    KvBegin,
    KvChunk,
    KvEnd,
    KvMessage,
    KvNack,
)
from transport.kv.same_host import SameHostMode
from transport.messages import KvMode, KvRoute

OK_DEADLINE_S = 30.0
Tamper = Callable[[list[bytes]], list[bytes] | None]


@pytest.fixture
async def receiver(ctx: zmq.asyncio.Context) -> AsyncIterator[KvReceiver]:
    async with started_receiver(ctx, window_bytes=64 * 1024) as rx:
        yield rx


class RecordingSink:
    def __init__(self) -> None:
        self.writes: list[tuple[int, int, np.ndarray]] = []

    def write(self, layer: int, row_offset: int, rows: np.ndarray) -> None:
        self.writes.append((layer, row_offset, rows.copy()))


class TamperingProxy:
    """Sits between one sender and a receiver; ``tamper`` may change or drop sender->receiver messages."""

    def __init__(self, ctx: zmq.asyncio.Context, target: str, tamper: Tamper) -> None:
        self._front = ctx.socket(zmq.ROUTER)
        self._front.bind("tcp://127.0.0.1:*")
        self.endpoint = self._front.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._back = ctx.socket(zmq.DEALER)
        self._back.connect(target)
        self._tamper = tamper
        self._peer = b""
        self._tasks = [asyncio.create_task(self._up()), asyncio.create_task(self._down())]

    async def _up(self) -> None:
        while True:
            peer, *frames = await self._front.recv_multipart()
            self._peer = peer
            out = self._tamper(frames)
            if out is not None:
                await self._back.send_multipart(out)

    async def _down(self) -> None:
        while True:
            frames = await self._back.recv_multipart()
            await self._front.send_multipart([self._peer, *frames])

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._front.close(0)
        self._back.close(0)


def on_chunk(seq: int, action: Callable[[list[bytes]], list[bytes] | None]) -> Tamper:
    decoder: Decoder[KvMessage] = Decoder(KvMessage)

    def tamper(frames: list[bytes]) -> list[bytes] | None:
        msg = decoder.decode(frames)
        return action(frames) if isinstance(msg, KvChunk) and msg.seq == seq else frames

    return tamper


def flip_a_byte(frames: list[bytes]) -> list[bytes]:
    payload = bytearray(frames[1])
    payload[len(payload) // 2] ^= 0x40
    return [frames[0], bytes(payload)]


def drop_end(frames: list[bytes]) -> list[bytes] | None:
    return None if isinstance(Decoder(KvMessage).decode(frames), KvEnd) else frames


LAYERS = np.random.default_rng(7).standard_normal((2, 64, 2, 4, 32)).astype(np.float16)  # 32 KiB per layer


async def run_through_proxy(
    ctx: zmq.asyncio.Context,
    receiver: KvReceiver,
    tamper: Tamper,
    sink: RecordingSink,
    deadline_s: float,
    receive_deadline_s: float | None = None,
) -> tuple[BaseException | None, BaseException | None]:
    """Hand LAYERS over through a tampering proxy in 4 KiB chunks; return (sender error, receiver error)."""
    proxy = TamperingProxy(ctx, receiver.endpoint, tamper)
    # The proxy tampers with what goes through the socket: keep every chunk on it.
    sender = KvSender(ctx, security=INSECURE, max_chunk_bytes=4096, same_host=SameHostMode.OFF)

    async def send() -> None:
        stream = await sender.open(
            KvRoute(KvMode.P2P, proxy.endpoint, "t"),
            num_layers=2,
            rows_per_layer=64,
            row_shape=(2, 4, 32),
            dtype="float16",
            deadline_s=deadline_s,
        )
        for layer in range(2):
            await stream.send_layer(layer, LAYERS[layer])
        await stream.finish({"first_token": 1})

    try:
        results = await asyncio.gather(
            send(),
            receiver.receive(p2p("t"), sink, deadline_s=receive_deadline_s or deadline_s),
            return_exceptions=True,
        )
    finally:
        await sender.close()
        await proxy.close()
    sent, received = results
    return (
        sent if isinstance(sent, BaseException) else None,
        received if isinstance(received, BaseException) else None,
    )


def assert_code(error: BaseException | None, code: ErrorCode) -> None:
    assert isinstance(error, PdorchError), error
    assert error.code is code, error


async def test_untampered_proxy_delivers(ctx: zmq.asyncio.Context, receiver: KvReceiver) -> None:
    sink = RecordingSink()
    sent, received = await run_through_proxy(ctx, receiver, lambda frames: frames, sink, OK_DEADLINE_S)
    assert sent is None and received is None
    assert len(sink.writes) == 16  # 2 layers x 8 chunks of 8 rows


async def test_corrupted_chunk_is_kv_corrupt_on_both_sides_and_never_reaches_the_sink(
    ctx: zmq.asyncio.Context, receiver: KvReceiver
) -> None:
    sink = RecordingSink()
    sent, received = await run_through_proxy(ctx, receiver, on_chunk(2, flip_a_byte), sink, OK_DEADLINE_S)
    assert_code(received, ErrorCode.KV_CORRUPT)
    assert_code(sent, ErrorCode.KV_CORRUPT)
    assert len(sink.writes) == 2  # chunks 0 and 1 only; chunk 2 was refused, nothing after it taken
    for layer, offset, rows in sink.writes:
        assert np.array_equal(rows, LAYERS[layer, offset : offset + rows.shape[0]])


async def test_lost_chunk_is_kv_truncated(ctx: zmq.asyncio.Context, receiver: KvReceiver) -> None:
    sink = RecordingSink()
    sent, received = await run_through_proxy(ctx, receiver, on_chunk(5, lambda _: None), sink, OK_DEADLINE_S)
    assert_code(received, ErrorCode.KV_TRUNCATED)
    assert_code(sent, ErrorCode.KV_TRUNCATED)


async def test_lost_last_chunk_is_kv_truncated_at_the_end(
    ctx: zmq.asyncio.Context, receiver: KvReceiver
) -> None:
    sink = RecordingSink()
    sent, received = await run_through_proxy(ctx, receiver, on_chunk(15, lambda _: None), sink, OK_DEADLINE_S)
    assert_code(received, ErrorCode.KV_TRUNCATED)
    assert_code(sent, ErrorCode.KV_TRUNCATED)


async def test_lost_end_is_kv_timeout_on_both_sides(ctx: zmq.asyncio.Context, receiver: KvReceiver) -> None:
    sink = RecordingSink()
    sent, received = await run_through_proxy(ctx, receiver, drop_end, sink, 30, receive_deadline_s=0.5)
    assert_code(received, ErrorCode.KV_TIMEOUT)
    assert_code(sent, ErrorCode.KV_TIMEOUT)  # told by the receiver, long before its own deadline


class RawPeer:
    """A hand-driven DEALER speaking the KV protocol, to craft what a correct sender never sends."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self._encoder = Encoder()
        self._decoder: Decoder[KvMessage] = Decoder(KvMessage)

    async def send(self, msg: KvMessage) -> None:
        await self.sock.send_multipart([bytes(f) for f in self._encoder.encode(msg)])

    async def recv(self, timeout_s: float = 10.0) -> KvMessage:
        frames = await asyncio.wait_for(self.sock.recv_multipart(), timeout_s)
        return self._decoder.decode(frames)

    async def begin(
        self, tid: str, rows: int, row_shape: list[int], checksum_rows: int | None = None
    ) -> KvAccept:
        span = checksum_rows or checksum_rows_for(row_shape[0])
        await self.send(KvBegin(KV_PROTOCOL_VERSION, tid, 1, rows, row_shape, "uint8", span))
        accept = await self.recv()
        assert isinstance(accept, KvAccept)
        return accept


@pytest.fixture
async def wide_receiver(ctx: zmq.asyncio.Context) -> AsyncIterator[KvReceiver]:
    """A receiver whose window takes a chunk of several checksum spans."""
    async with started_receiver(ctx, window_bytes=1024 * 1024) as rx:
        yield rx


SPAN_ROWS = 64  # 64 rows of 1 KiB: the smallest span a receiver accepts (MIN_CHECKSUM_SPAN_BYTES)


async def nacked_chunk(
    ctx: zmq.asyncio.Context,
    receiver: KvReceiver,
    begin: tuple[int, list[int], int | None],
    make_chunk: Callable[[KvAccept], KvChunk],
) -> tuple[KvNack, RecordingSink]:
    """Begin a transfer of ``begin = (rows, row_shape, checksum_rows)`` by hand, send the one chunk
    ``make_chunk`` builds, and return the receiver's nack (both sides must agree on its code)."""
    peer = RawPeer(ctx, receiver.endpoint)
    sink = RecordingSink()
    tid = "hand-made"
    receiving = asyncio.create_task(receiver.receive(p2p(tid), sink, deadline_s=OK_DEADLINE_S))
    rows, row_shape, checksum_rows = begin
    accept = await peer.begin(tid, rows, row_shape, checksum_rows)
    await peer.send(make_chunk(accept))
    nack = await peer.recv()
    assert isinstance(nack, KvNack)
    with pytest.raises(PdorchError) as info:
        await receiving
    assert info.value.code == nack.code
    peer.sock.close()
    return nack, sink


async def test_spans_before_a_corrupted_span_reach_the_sink_and_nothing_from_it_on(
    ctx: zmq.asyncio.Context, wide_receiver: KvReceiver
) -> None:
    rows = np.random.default_rng(3).integers(0, 256, (4 * SPAN_ROWS, 1024), dtype=np.uint8)
    bad = rows.copy()
    bad[2 * SPAN_ROWS + 5, 7] ^= 0x10  # in the third span
    nack, sink = await nacked_chunk(
        ctx,
        wide_receiver,
        (4 * SPAN_ROWS, [1024], SPAN_ROWS),
        lambda _: KvChunk("hand-made", 0, 0, 0, span_checksums(rows, SPAN_ROWS), bad),
    )
    assert nack.code == ErrorCode.KV_CORRUPT and "span 2" in nack.message
    written = [(layer, offset, len(r)) for layer, offset, r in sink.writes]
    assert written == [(0, 0, SPAN_ROWS), (0, SPAN_ROWS, SPAN_ROWS)]
    assert np.array_equal(np.concatenate([r for _, _, r in sink.writes]), rows[: 2 * SPAN_ROWS])


async def test_a_chunk_with_the_wrong_number_of_checksums_is_nacked_corrupt(
    ctx: zmq.asyncio.Context, wide_receiver: KvReceiver
) -> None:
    rows = np.zeros((4 * SPAN_ROWS, 1024), np.uint8)
    one_for_four_spans = [checksum(rows)]
    nack, sink = await nacked_chunk(
        ctx,
        wide_receiver,
        (4 * SPAN_ROWS, [1024], SPAN_ROWS),
        lambda _: KvChunk("hand-made", 0, 0, 0, one_for_four_spans, rows),
    )
    assert nack.code == ErrorCode.KV_CORRUPT and sink.writes == []


async def test_a_begin_with_tiny_checksum_spans_is_refused(
    ctx: zmq.asyncio.Context, wide_receiver: KvReceiver
) -> None:
    peer = RawPeer(ctx, wide_receiver.endpoint)
    receiving = asyncio.create_task(
        wide_receiver.receive(p2p("tiny"), RecordingSink(), deadline_s=OK_DEADLINE_S)
    )
    # One checksum per row of 1 KiB: a chunk would need a thousand checksums per MiB.
    await peer.send(KvBegin(KV_PROTOCOL_VERSION, "tiny", 1, 4096, [1024], "uint8", 1))
    nack = await peer.recv()
    assert isinstance(nack, KvNack) and nack.code == ErrorCode.BAD_MESSAGE
    receiving.cancel()
    with contextlib.suppress(asyncio.CancelledError, PdorchError):
        await receiving
    peer.sock.close()


async def test_raw_chunk_with_a_bad_checksum_is_nacked_corrupt(
    ctx: zmq.asyncio.Context, receiver: KvReceiver
) -> None:
    rows = np.arange(32, dtype=np.uint8).reshape(4, 8)
    bad = rows.copy()
    bad[1, 1] ^= 1
    nack, sink = await nacked_chunk(
        ctx, receiver, (4, [8], None), lambda _: KvChunk("hand-made", 0, 0, 0, [checksum(rows)], bad)
    )
    assert nack.code == ErrorCode.KV_CORRUPT and sink.writes == []


async def test_raw_sender_exceeding_its_credit_is_refused(
    ctx: zmq.asyncio.Context, receiver: KvReceiver
) -> None:
    def beyond_the_credit(accept: KvAccept) -> KvChunk:
        rows = np.zeros((accept.credit_bytes // 1024 + 1, 1024), np.uint8)
        return KvChunk("hand-made", 0, 0, 0, [checksum(rows)], rows)

    # 4 MiB announced, far beyond the 64 KiB window
    nack, sink = await nacked_chunk(ctx, receiver, (4096, [1024], None), beyond_the_credit)
    assert nack.code == ErrorCode.KV_CORRUPT and sink.writes == []


GARBAGE: list[list[bytes]] = [
    [b""],
    [b"\x00\x01\x02"],
    [b"\xc1"],
    [b"\x93\xa5chunk\x01\x02"],
    # a short frame
    [Encoder().encode(KvChunk("nobody", 0, 0, 0, [0], np.zeros((1, 1), np.uint8)))[0], b"\x00"],
    [bytes(f) for f in Encoder().encode(KvChunk("nobody", 0, 0, 0, [0], np.zeros((1, 1), np.uint8)))],
    [bytes(f) for f in Encoder().encode(KvEnd("nobody", 1, 1, [1]))],
    [bytes(f) for f in Encoder().encode(KvAccept("nobody", 1))],  # a sender-bound message, misdirected
]


async def test_garbage_is_dropped_and_later_transfers_are_fine(
    ctx: zmq.asyncio.Context, receiver: KvReceiver
) -> None:
    garbage = ctx.socket(zmq.DEALER)
    garbage.setsockopt(zmq.LINGER, 0)
    garbage.connect(receiver.endpoint)
    for frames in GARBAGE:
        await garbage.send_multipart(frames)
    # Larger than any frame the codec makes: libzmq cuts this peer off before allocating it.
    await garbage.send(b"\x00" * (MAX_FRAME_BYTES + 1))
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while receiver.stats.dropped_messages < len(GARBAGE) and loop.time() < end:
        await asyncio.sleep(0.01)
    assert receiver.stats.dropped_messages >= len(GARBAGE)
    sink = RecordingSink()
    sent, received = await run_through_proxy(ctx, receiver, lambda frames: frames, sink, OK_DEADLINE_S)
    assert sent is None and received is None
    garbage.close()
