"""KV-plane messages through the codec: round trips, zero-copy row frames, malformed input."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from transport.codec import Decoder, Encoder
from transport.errors import ErrorCode, PdorchError
from transport.kv.messages import (
    KV_PROTOCOL_VERSION,
    KvAbort,
    KvAccept,
    KvAck,
    KvBegin,
    KvChunk,
    KvCredit,
    KvEnd,
    KvFetch,
    KvMessage,
    KvNack,
    nack_error,
)

CONTROL_MESSAGES = [
    KvBegin(KV_PROTOCOL_VERSION, "t1", 32, 512, [2, 8, 128], "float16", 128),
    KvAccept("t1", 1 << 25),
    KvCredit("t1", 1 << 23),
    KvEnd("t1", 40, 123456, [512] * 32, {"first_token": 42, "note": "x"}),
    KvEnd("t1", 0, 0, []),
    KvAck("t1"),
    KvNack("t1", "kv_corrupt", "checksum mismatch"),
    KvAbort("t1", "prefill failed"),
    KvFetch(KV_PROTOCOL_VERSION, "t1", 5000),
]


@pytest.mark.parametrize("msg", CONTROL_MESSAGES, ids=lambda m: type(m).__name__)
def test_control_messages_round_trip_in_one_frame(msg: msgspec.Struct) -> None:
    frames = Encoder().encode(msg)
    assert len(frames) == 1
    assert Decoder(KvMessage).decode(frames) == msg


def test_chunk_rows_travel_as_an_aux_frame_without_copy() -> None:
    rows = np.arange(4 * 2 * 8 * 128, dtype=np.float16).reshape(4, 2, 8, 128)
    frames = Encoder().encode(KvChunk("t1", 3, 7, 128, [0xFFFF_FFFF_FFFF_FFFF, 0], rows))
    assert len(frames) == 2
    assert np.shares_memory(np.frombuffer(frames[1], dtype=np.uint8), rows)
    back = Decoder(KvMessage).decode([bytes(f) for f in frames])
    assert isinstance(back, KvChunk)
    assert (back.seq, back.layer, back.row_offset, back.checksums) == (3, 7, 128, [0xFFFF_FFFF_FFFF_FFFF, 0])
    assert back.rows.dtype == rows.dtype and np.array_equal(back.rows, rows)


@pytest.mark.parametrize(
    "frames",
    [
        [b"\xc1"],  # not msgpack
        [msgspec.msgpack.encode(["no_such_tag", "t1"])],
        [msgspec.msgpack.encode(["accept", "t1", "not an int"])],
        [msgspec.msgpack.encode(["chunk", "t1", 0, 0, 0, 1, ["float16", [4], 1, 1]])],  # missing frame
        [msgspec.msgpack.encode(["chunk", "t1", 0, 0, 0, 1, ["float16", [4], 1, 1]]), b"\x00" * 3],
        [msgspec.msgpack.encode(["chunk", "t1", 0, 0, 0, 1, ["object", [1], 1, 1]]), b"\x00" * 8],
    ],
)
def test_malformed_frames_raise_bad_message(frames: list[bytes]) -> None:
    with pytest.raises(PdorchError) as info:
        Decoder(KvMessage).decode(frames)
    assert info.value.code is ErrorCode.BAD_MESSAGE


def test_nack_error_keeps_known_codes_and_maps_unknown_ones_to_internal() -> None:
    assert nack_error(KvNack("t1", "kv_rejected", "full")).code is ErrorCode.KV_REJECTED
    assert nack_error(KvNack("t1", "from_the_future", "?")).code is ErrorCode.INTERNAL
