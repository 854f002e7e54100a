"""Centralized KV handoff through a KvBroker on real loopback sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
import zmq
import zmq.asyncio

from tests.support.kv import make_layers, via_broker, wait_until
from tests.support.kv import send_all as send_layers
from tests.support.security import INSECURE
from transport.errors import ErrorCode, PdorchError
from transport.kv import ArraySink, KvOutStream, KvReceiver, KvSender
from transport.kv.broker import KvBroker
from transport.messages import KvMode, KvRoute

OK_DEADLINE_S = 30.0
MIB = 1024 * 1024


@pytest.fixture
async def fetcher(ctx: zmq.asyncio.Context) -> AsyncIterator[KvReceiver]:
    rx = KvReceiver(ctx, security=INSECURE, bind=None)
    await rx.start()
    yield rx
    await rx.close()


async def send_all(sender: KvSender, endpoint: str, tid: str, layers: np.ndarray, deadline_s: float) -> None:
    route = KvRoute(KvMode.CENTRALIZED, endpoint, tid)
    await send_layers(sender, route, layers, {"first_token": 7, "tid": tid}, deadline_s)


@pytest.mark.parametrize(
    ("num_layers", "rows", "row_shape", "dtype"),
    [(4, 300, (2, 8, 128), "float16"), (2, 50, (16, 2, 2, 16), "float32"), (1, 2200, (2, 8, 128), "float32")],
)
async def test_round_trip_through_the_broker_then_it_forgets(
    broker: KvBroker,
    sender: KvSender,
    fetcher: KvReceiver,
    num_layers: int,
    rows: int,
    row_shape: tuple[int, ...],
    dtype: str,
) -> None:
    layers = make_layers(num_layers, rows, row_shape, dtype)
    await send_all(sender, broker.endpoint, "t1", layers, OK_DEADLINE_S)
    assert broker.stats.entries == 1 and broker.stats.bytes == layers.nbytes
    sink = ArraySink(num_layers, rows, row_shape, dtype)
    assert await fetcher.receive(via_broker(broker.endpoint, "t1"), sink, deadline_s=OK_DEADLINE_S) == {
        "first_token": 7,
        "tid": "t1",
    }
    assert np.array_equal(sink.layers, layers)
    await wait_until(lambda: broker.stats.delivered == 1)
    assert broker.stats.entries == 0 and broker.stats.bytes == 0


async def test_fetch_may_come_before_the_prefill_side_sends(
    broker: KvBroker, sender: KvSender, fetcher: KvReceiver
) -> None:
    layers = make_layers(3, 100, (4, 16), "float16")
    sink = ArraySink(3, 100, (4, 16), "float16")
    fetching = asyncio.create_task(
        fetcher.receive(via_broker(broker.endpoint, "early"), sink, deadline_s=OK_DEADLINE_S)
    )
    await wait_until(lambda: broker.stats.waiting_fetches == 1)
    await send_all(sender, broker.endpoint, "early", layers, OK_DEADLINE_S)
    assert (await fetching)["tid"] == "early"
    assert np.array_equal(sink.layers, layers)


async def test_full_broker_rejects_the_transfer_and_tells_the_fetcher(
    ctx: zmq.asyncio.Context, sender: KvSender, fetcher: KvReceiver
) -> None:
    # One sender may fill it here (by default one holds at most half).
    small = KvBroker(
        ctx,
        security=INSECURE,
        bind="tcp://127.0.0.1:0",
        capacity_bytes=768 * 1024,
        ttl_s=60,
        max_sender_bytes=768 * 1024,
    )
    await small.start()
    try:
        await send_all(
            sender, small.endpoint, "fits", make_layers(2, 64, (2, 8, 128), "float16"), OK_DEADLINE_S
        )
        with pytest.raises(PdorchError) as info:
            await send_all(sender, small.endpoint, "too-big", make_layers(2, 64, (2, 8, 128), "float16"), 30)
        assert info.value.code is ErrorCode.KV_REJECTED
        assert small.stats.rejected == 1 and small.stats.entries == 1
        with pytest.raises(PdorchError) as fetched:
            await fetcher.receive(
                via_broker(small.endpoint, "too-big"), ArraySink(1, 1, (1,), "uint8"), deadline_s=30
            )
        assert fetched.value.code is ErrorCode.KV_REJECTED  # told at once, not after the deadline
    finally:
        await small.close()


async def test_duplicate_transfer_id_is_rejected(broker: KvBroker, sender: KvSender) -> None:
    await send_all(sender, broker.endpoint, "dup", make_layers(1, 10, (4,), "float16"), OK_DEADLINE_S)
    with pytest.raises(PdorchError) as info:
        await send_all(sender, broker.endpoint, "dup", make_layers(1, 10, (4,), "float16"), OK_DEADLINE_S)
    assert info.value.code is ErrorCode.KV_REJECTED


async def test_unclaimed_transfer_is_evicted_after_its_ttl(
    ctx: zmq.asyncio.Context, sender: KvSender, fetcher: KvReceiver
) -> None:
    short = KvBroker(ctx, security=INSECURE, bind="tcp://127.0.0.1:0", capacity_bytes=8 * MIB, ttl_s=0.3)
    await short.start()
    try:
        await send_all(sender, short.endpoint, "stale", make_layers(2, 64, (4,), "float16"), OK_DEADLINE_S)
        await wait_until(lambda: short.stats.evicted == 1)
        assert short.stats.entries == 0 and short.stats.bytes == 0
        with pytest.raises(PdorchError) as info:
            await fetcher.receive(
                via_broker(short.endpoint, "stale"), ArraySink(2, 64, (4,), "float16"), deadline_s=30
            )
        assert info.value.code is ErrorCode.KV_TIMEOUT
        assert "evicted" in info.value.message
    finally:
        await short.close()


async def test_fetch_of_a_transfer_that_never_comes_is_kv_timeout(
    broker: KvBroker, fetcher: KvReceiver
) -> None:
    with pytest.raises(PdorchError) as info:
        await fetcher.receive(
            via_broker(broker.endpoint, "ghost"), ArraySink(1, 1, (1,), "uint8"), deadline_s=0.5
        )
    assert info.value.code is ErrorCode.KV_TIMEOUT
    await wait_until(lambda: broker.stats.waiting_fetches == 0)


async def first_layer_of_two(sender: KvSender, broker_endpoint: str, tid: str) -> KvOutStream:
    """A transfer to the broker of two layers of 8 float16 rows of 4, of which only the first is sent."""
    stream = await sender.open(
        KvRoute(KvMode.CENTRALIZED, broker_endpoint, tid),
        num_layers=2,
        rows_per_layer=8,
        row_shape=(4,),
        dtype="float16",
        deadline_s=OK_DEADLINE_S,
    )
    await stream.send_layer(0, make_layers(1, 8, (4,), "float16")[0])
    return stream


async def test_prefill_abort_is_told_to_a_waiting_fetcher(
    broker: KvBroker, sender: KvSender, fetcher: KvReceiver
) -> None:
    fetching = asyncio.create_task(
        fetcher.receive(
            via_broker(broker.endpoint, "aborted"), ArraySink(2, 8, (4,), "float16"), deadline_s=OK_DEADLINE_S
        )
    )
    await wait_until(lambda: broker.stats.waiting_fetches == 1)
    stream = await first_layer_of_two(sender, broker.endpoint, "aborted")
    await stream.abort("prefill failed")
    with pytest.raises(PdorchError) as info:
        await fetching
    assert info.value.code is ErrorCode.KV_TRUNCATED
    await wait_until(lambda: broker.stats.entries == 0)


async def test_a_fetch_whose_transfer_stalls_past_the_brokers_wait_is_told_at_once(
    ctx: zmq.asyncio.Context, sender: KvSender, fetcher: KvReceiver
) -> None:
    """The broker serves a fetch at most ``max_fetch_wait_s``: when the prefill side stalls mid-way
    past it, the fetcher is told then (abort), not left waiting for its own, longer deadline."""
    brief = KvBroker(
        ctx,
        security=INSECURE,
        bind="tcp://127.0.0.1:0",
        capacity_bytes=8 * MIB,
        ttl_s=60,
        max_fetch_wait_s=0.3,
    )
    await brief.start()
    try:
        stream = await first_layer_of_two(sender, brief.endpoint, "stalled")  # then nothing more
        with pytest.raises(PdorchError) as info:
            await asyncio.wait_for(
                fetcher.receive(
                    via_broker(brief.endpoint, "stalled"), ArraySink(2, 8, (4,), "float16"), deadline_s=30
                ),
                10,
            )
        assert info.value.code is ErrorCode.KV_TRUNCATED and "more of transfer stalled" in info.value.message
        assert brief.stats.failed_fetches == 1 and brief.stats.entries == 1  # kept for another fetch
        await stream.abort("test done")
    finally:
        await brief.close()


class DyingSink(ArraySink):
    """Signals after its first write, so the test can kill its fetcher mid-transfer."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.first_write = asyncio.Event()

    def write(self, layer: int, row_offset: int, rows: np.ndarray) -> None:
        super().write(layer, row_offset, rows)
        self.first_write.set()


async def test_fetcher_dying_mid_fetch_leaves_the_transfer_for_another(
    ctx: zmq.asyncio.Context, broker: KvBroker, sender: KvSender
) -> None:
    layers = make_layers(4, 512, (2, 8, 128), "float16")  # 8 MiB: many windows of 256 KiB
    await send_all(sender, broker.endpoint, "survivor", layers, OK_DEADLINE_S)
    doomed = KvReceiver(ctx, security=INSECURE, bind=None, window_bytes=256 * 1024)
    await doomed.start()
    dying_sink = DyingSink(4, 512, (2, 8, 128), "float16")
    fetching = asyncio.create_task(
        doomed.receive(via_broker(broker.endpoint, "survivor"), dying_sink, deadline_s=30)
    )
    await asyncio.wait_for(dying_sink.first_write.wait(), 10)
    await doomed.close()  # the decode agent dies with the transfer half taken
    with pytest.raises(PdorchError):
        await fetching
    assert dying_sink.bytes_written < layers.nbytes
    assert broker.stats.entries == 1

    second = KvReceiver(ctx, security=INSECURE, bind=None)
    await second.start()
    try:
        sink = ArraySink(4, 512, (2, 8, 128), "float16")
        trailer = await second.receive(
            via_broker(broker.endpoint, "survivor"), sink, deadline_s=OK_DEADLINE_S
        )
        assert trailer["tid"] == "survivor"
        assert np.array_equal(sink.layers, layers)
        await wait_until(lambda: broker.stats.delivered == 1 and broker.stats.entries == 0)
        await wait_until(lambda: broker.stats.failed_fetches == 1)
    finally:
        await second.close()


async def test_garbage_to_the_broker_is_dropped_and_later_transfers_are_fine(
    ctx: zmq.asyncio.Context, broker: KvBroker, sender: KvSender, fetcher: KvReceiver
) -> None:
    garbage = ctx.socket(zmq.DEALER)
    garbage.setsockopt(zmq.LINGER, 0)
    garbage.connect(broker.endpoint)
    junk = [
        [b""],
        [b"\xc1\xc1"],
        [b"\x92\xa5fetch\x01"],
        [b"\x94\xa6credit\xa1x\x01"],
        [b"\x00" * 1000, b"x"],
    ]
    for frames in junk:
        await garbage.send_multipart(frames)
    await wait_until(lambda: broker.stats.dropped_messages >= len(junk))
    layers = make_layers(2, 40, (8,), "float32")
    await send_all(sender, broker.endpoint, "after-junk", layers, OK_DEADLINE_S)
    sink = ArraySink(2, 40, (8,), "float32")
    await fetcher.receive(via_broker(broker.endpoint, "after-junk"), sink, deadline_s=OK_DEADLINE_S)
    assert np.array_equal(sink.layers, layers)
    garbage.close()
