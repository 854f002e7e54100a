"""Credit accounting, chunk planning, the checksum and a transfer giving up, without sockets."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from transport.codec import MAX_FRAME_BYTES
from transport.errors import ErrorCode, PdorchError
from transport.kv.checksum import (
    CHECKSUM_SPAN_BYTES,
    checksum,
    checksum_rows_for,
    min_checksum_rows,
    span_checksums,
    span_count,
)
from transport.kv.chunking import chunk_spans, rows_per_chunk
from transport.kv.deadline import Deadline
from transport.kv.flow_control import ReceiveWindow, SendCredit
from transport.kv.messages import KvAbort, KvMessage
from transport.kv.out_stream import KvOutStream


def test_receive_window_regrants_in_quarters_and_detects_overrun() -> None:
    window = ReceiveWindow(1000)
    assert window.first_grant() == 1000
    assert window.on_arrival(600)
    assert window.on_consumed(200) == 0  # below a quarter: not worth a message yet
    assert window.on_consumed(100) == 300
    assert window.on_arrival(400)
    assert not window.on_arrival(301)  # 1000 + 300 granted, 1000 arrived: 300 left
    assert window.on_arrival(300)


async def test_send_credit_waits_for_grants_and_never_exceeds_them() -> None:
    credit = SendCredit(cap_bytes=1 << 30)
    credit.grant(100)
    await credit.take(60)
    waiter = asyncio.create_task(credit.take(60))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    credit.grant(20)
    await asyncio.sleep(0.01)
    assert waiter.done()
    assert credit.peak_in_flight <= 100


async def test_a_failed_send_credit_releases_its_waiters_with_the_error() -> None:
    credit = SendCredit(cap_bytes=1 << 30)
    waiter = asyncio.create_task(credit.take(1))
    await asyncio.sleep(0.01)
    assert not waiter.done()  # no grant yet: it waits (the transfer's deadline fails it, below)
    credit.fail(PdorchError(ErrorCode.KV_CORRUPT, "receiver said so"))
    with pytest.raises(PdorchError) as info:
        await waiter
    assert info.value.code is ErrorCode.KV_CORRUPT


async def test_sender_cap_bounds_in_flight_below_the_receivers_credit() -> None:
    credit = SendCredit(cap_bytes=100)
    credit.grant(1000)
    await credit.take(80)
    second = asyncio.create_task(credit.take(80))
    await asyncio.sleep(0.01)
    assert not second.done()  # 80 more would put 160 in flight, over the sender's own 100
    credit.grant(80)  # the receiver consumed the first 80
    await asyncio.wait_for(second, 5)
    assert credit.peak_in_flight == 80


def test_chunks_cover_every_row_once_within_the_size_limit() -> None:
    per_chunk = rows_per_chunk(row_bytes=4096, max_chunk_bytes=1 << 20)
    assert per_chunk == 256
    spans = chunk_spans(1000, per_chunk)
    assert spans == [(0, 256), (256, 256), (512, 256), (768, 232)]
    assert rows_per_chunk(row_bytes=4096, max_chunk_bytes=1 << 30) * 4096 <= MAX_FRAME_BYTES
    assert rows_per_chunk(row_bytes=3 << 20, max_chunk_bytes=1 << 20) == 1  # one row at least


def test_a_row_larger_than_a_frame_is_refused() -> None:
    with pytest.raises(PdorchError):
        rows_per_chunk(row_bytes=MAX_FRAME_BYTES + 1, max_chunk_bytes=MAX_FRAME_BYTES)


def test_checksum_sees_a_single_flipped_bit() -> None:
    rows = np.random.default_rng(1).standard_normal((64, 2, 8, 128)).astype(np.float16)
    flipped = rows.copy()
    flipped.view(np.uint8).reshape(-1)[12345] ^= 1
    assert checksum(rows) == checksum(rows.copy())
    assert checksum(rows) != checksum(flipped)


def test_span_checksums_cover_each_span_in_order() -> None:
    rows = np.arange(10 * 4, dtype=np.uint8).reshape(10, 4)
    assert span_checksums(rows, 4) == [checksum(rows[0:4]), checksum(rows[4:8]), checksum(rows[8:10])]
    assert span_checksums(rows, 10) == span_checksums(rows, 64) == [checksum(rows)]
    assert span_count(10, 4) == 3 and span_count(8, 4) == 2 and span_count(1, 4) == 1


def test_spans_are_sized_for_the_cache_and_never_below_the_minimum() -> None:
    row_bytes = 2 * 8 * 128 * 2  # one token of a Llama-3-8B layer
    assert checksum_rows_for(row_bytes) * row_bytes == CHECKSUM_SPAN_BYTES
    assert checksum_rows_for(row_bytes) >= min_checksum_rows(row_bytes)
    huge_row = 4 * CHECKSUM_SPAN_BYTES
    assert checksum_rows_for(huge_row) == min_checksum_rows(huge_row) == 1


async def test_a_transfer_cancelled_while_telling_its_receiver_still_closes() -> None:
    """Giving up sends the receiver an abort; a caller cancelled during that send must still leave
    the transfer closed (its sender forgets it): no later give-up would try again."""
    stuck = asyncio.Event()

    async def send(msg: KvMessage) -> None:
        if isinstance(msg, KvAbort):
            stuck.set()
            await asyncio.Event().wait()  # a send that never completes

    closed: list[bool] = []
    stream = KvOutStream(
        transfer_id="t",
        num_layers=1,
        rows_per_layer=1,
        row_shape=(4,),
        dtype="uint8",
        deadline=Deadline(30),
        send=send,
        max_chunk_bytes=1 << 20,
        max_in_flight_bytes=1 << 20,
        on_closed=lambda: closed.append(True),
    )
    await stream.begin()
    aborting = asyncio.create_task(stream.abort("prefill failed"))
    await stuck.wait()
    aborting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await aborting
    assert closed == [True]
    await stream.abort("again")  # a no-op now
    assert closed == [True]
