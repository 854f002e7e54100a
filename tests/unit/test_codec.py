"""Codec round trips: frame counts, zero-copy arrays, split frames, and strict rejection."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from transport.codec import MAX_FRAME_BYTES, Decoder, Encoder
from transport.errors import ErrorCode, PdorchError
from transport.messages import (
    Cancel,
    DecodeJob,
    FromWorker,
    Heartbeat,
    Hello,
    KvMode,
    KvRoute,
    Load,
    PrefillJob,
    Role,
    SamplingParams,
    TokenOutput,
    ToWorker,
)


class Carrier(msgspec.Struct, tag="carrier", array_like=True):
    name: str
    arrays: list[np.ndarray]


@pytest.mark.parametrize(
    "msg",
    [
        Hello(1, "w0", Role.DECODE, "reference", "m", 4096, 16, 100, kv_endpoint="tcp://127.0.0.1:1"),
        Heartbeat(Load(blocks_used=3, blocks_total=10, running=2)),
        TokenOutput("r1", [1, 2, 3], None),
    ],
)
def test_from_worker_round_trip_is_one_frame(msg: object) -> None:
    frames = Encoder().encode(msg)
    assert len(frames) == 1
    assert Decoder(FromWorker).decode(frames) == msg


@pytest.mark.parametrize(
    "msg",
    [
        PrefillJob(
            "r",
            [1, 2],
            SamplingParams(max_tokens=4, temperature=0.7, seed=9),
            KvRoute(KvMode.P2P, "tcp://x:1", "t"),
        ),
        DecodeJob("r", [1], SamplingParams(), KvRoute(KvMode.CENTRALIZED, "tcp://b:2", "t")),
        Cancel("r"),
    ],
)
def test_to_worker_round_trip(msg: object) -> None:
    got = Decoder(ToWorker).decode(Encoder().encode(msg))
    assert _fields(got) == _fields(msg)


def _fields(msg: object) -> tuple[type, dict[str, object]]:
    """A message's type and fields, arrays as (dtype, list): comparable with ``==``."""
    fields = msgspec.structs.asdict(msg)  # type: ignore[arg-type]
    for name, value in fields.items():
        if isinstance(value, np.ndarray):
            fields[name] = (value.dtype.str, value.tolist())
    return type(msg), fields


def test_a_job_carries_its_prompt_packed_in_one_aux_frame() -> None:
    """Token ids as int32 beside the message, received as a view of the frame, not a list."""
    job = PrefillJob("r", list(range(1000, 5000)), SamplingParams(), None)
    assert job.prompt_token_ids.dtype == np.dtype("<i4")
    frames = Encoder().encode(job)
    assert len(frames) == 2 and len(memoryview(frames[1])) == 4 * 4000
    got = Decoder(ToWorker).decode(frames)
    assert isinstance(got, PrefillJob)
    assert got.prompt_token_ids.dtype == np.dtype("<i4") and got.prompt_token_ids.tolist() == list(
        range(1000, 5000)
    )
    assert np.shares_memory(got.prompt_token_ids, np.frombuffer(frames[1], dtype=np.uint8))


@pytest.mark.parametrize(
    "prompt",
    [
        np.array([1.0, 2.0], dtype=np.float32),  # not integers
        np.array([[1, 2]], dtype=np.int32),  # not 1-D
        np.array([1, 2**40], dtype=np.int64),  # past int32
    ],
)
def test_a_job_whose_prompt_is_not_token_ids_is_a_bad_message(prompt: np.ndarray) -> None:
    # As a peer could send it: the array on the wire as it is, whatever the sender's code checks.
    # (Ids out of a model's vocabulary, negative ones included, are the engine's to refuse.)
    body = msgspec.msgpack.encode(
        [
            "prefill",
            "r",
            ["<f4" if prompt.dtype.kind == "f" else prompt.dtype.str, list(prompt.shape), 1, 1],
            [4],
        ]
    )
    frames = [body, prompt.tobytes()]
    with pytest.raises(PdorchError) as e:
        Decoder(ToWorker).decode(frames)
    assert e.value.code is ErrorCode.BAD_MESSAGE


def test_arrays_travel_as_zero_copy_aux_frames() -> None:
    a = np.arange(12, dtype=np.float64).reshape(3, 4)
    b = np.ones((2, 2), dtype=np.float16)
    frames = Encoder().encode(Carrier("x", [a, b]))
    assert len(frames) == 3
    # The aux frame is a view of the array's own memory, not a copy.
    assert np.shares_memory(np.frombuffer(frames[1], dtype=np.float64), a)
    out = Decoder(Carrier).decode([bytes(f) for f in frames])
    assert out.arrays[0].dtype == np.float64 and np.array_equal(out.arrays[0], a)
    assert out.arrays[1].dtype == np.float16 and np.array_equal(out.arrays[1], b)


def test_decoded_array_wraps_the_received_frame() -> None:
    a = np.arange(1000, dtype=np.float32)
    frames = [bytearray(f) if i else f for i, f in enumerate(Encoder().encode(Carrier("x", [a])))]
    out = Decoder(Carrier).decode(frames)
    assert np.shares_memory(out.arrays[0], np.frombuffer(frames[1], dtype=np.uint8))


def test_large_array_is_split_into_frames_of_at_most_16_mib() -> None:
    a = np.arange((MAX_FRAME_BYTES * 2 + 1024) // 4, dtype=np.float32)
    frames = Encoder().encode(Carrier("big", [a]))
    sizes = [memoryview(f).nbytes for f in frames[1:]]
    assert len(sizes) == 3 and max(sizes) <= MAX_FRAME_BYTES and sum(sizes) == a.nbytes
    assert np.array_equal(Decoder(Carrier).decode([bytes(f) for f in frames]).arrays[0], a)


def test_non_contiguous_array_is_encoded_correctly() -> None:
    a = np.arange(20, dtype=np.int32).reshape(4, 5)[:, ::2]
    out = Decoder(Carrier).decode([bytes(f) for f in Encoder().encode(Carrier("x", [a]))])
    assert np.array_equal(out.arrays[0], a)


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b""],
        [b"\xff\x00garbage"],
        [msgspec.msgpack.encode(["nope", 1])],
        [msgspec.msgpack.encode(["tok", "r", "not-a-list"])],
    ],
)
def test_garbage_is_a_bad_message(frames: list[bytes]) -> None:
    with pytest.raises(PdorchError) as e:
        Decoder(FromWorker).decode(frames)
    assert e.value.code is ErrorCode.BAD_MESSAGE


@pytest.mark.parametrize(
    "header, aux",
    [
        (["<f8", [4], 0, 1], [b"x" * 8]),  # wrong byte count
        (["<f8", [1], 3, 1], [b"x" * 8]),  # missing frame
        (["|O", [1], 0, 1], [b"x" * 8]),  # object dtype refused
        (["<f8", [-1], 0, 1], [b"x" * 8]),  # negative dim
        ("junk", [b""]),
    ],
)
def test_bad_array_headers_are_refused(header: object, aux: list[bytes]) -> None:
    payload = msgspec.msgpack.encode(["carrier", "x", [header]])
    with pytest.raises(PdorchError) as e:
        Decoder(Carrier).decode([payload, *aux])
    assert e.value.code is ErrorCode.BAD_MESSAGE
