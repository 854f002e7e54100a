"""Messages <-> ZeroMQ frames.

A message is one msgpack frame, followed by zero or more *aux frames* that carry the raw bytes of
numpy arrays found in the message, never copied on the way out (zmq sends them with
``copy=False``) and wrapped, not copied, on the way in (``np.frombuffer`` over the received frame).
An array travels in the msgpack frame as ``[dtype, shape, first_frame, n_frames]``; arrays larger
than :data:`MAX_FRAME_BYTES` are split over several frames (and joined with one copy on receipt).

Decoding validates strictly: a frame that is not a valid message of the expected union raises
:class:`PdorchError` with ``BAD_MESSAGE``; callers drop such messages and keep serving.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import msgspec
import numpy as np

from transport.errors import ErrorCode, PdorchError

MAX_FRAME_BYTES = 16 * 1024 * 1024
# Refuse absurd metadata before allocating anything for it.
MAX_DIMS = 8
_ALLOWED_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64", "uint8", "int8", "int32", "int64"})
# Wire dtype string -> dtype, for the strings seen so far (bounded: one entry per allowed dtype and
# byte order). Looking a dtype up by name per chunk is measurable on the KV plane.
_dtypes: dict[str, np.dtype] = {}


def _wire_dtype(dtype_str: Any) -> np.dtype:
    dtype = _dtypes.get(dtype_str) if isinstance(dtype_str, str) else None
    if dtype is None:
        dtype = np.dtype(dtype_str)
        if dtype.name not in _ALLOWED_DTYPES:
            raise PdorchError(ErrorCode.BAD_MESSAGE, f"unsupported array dtype {dtype_str}")
        _dtypes[dtype_str] = dtype
    return dtype


Frame = bytes | memoryview | Any  # Any: zmq.Frame, which exposes the buffer protocol
T = TypeVar("T")


def _encode_array(arr: np.ndarray, aux: list[Any]) -> list[Any]:
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    try:  # its bytes as they are (a third of the cost of a flat uint8 view, per message)
        flat = memoryview(arr).cast("B")
    except (TypeError, ValueError):  # a dtype with no buffer format (e.g. bfloat16 from ml_dtypes)
        flat = arr.reshape(-1).view(np.uint8).data
    first = len(aux)
    if flat.nbytes <= MAX_FRAME_BYTES:
        aux.append(flat)
    else:
        for start in range(0, flat.nbytes, MAX_FRAME_BYTES):
            aux.append(flat[start : start + MAX_FRAME_BYTES])
    return [arr.dtype.str, arr.shape, first, len(aux) - first]


def _decode_array(obj: Any, aux: Sequence[Any]) -> np.ndarray:
    try:
        dtype_str, shape, first, count = obj
        dtype = _wire_dtype(dtype_str)
        shape = tuple(shape)
    except (TypeError, ValueError) as e:
        raise PdorchError(ErrorCode.BAD_MESSAGE, f"bad array header: {e}") from None
    if len(shape) > MAX_DIMS or not all(type(d) is int and d >= 0 for d in shape):
        raise PdorchError(ErrorCode.BAD_MESSAGE, f"unsupported array {dtype_str}{shape}")
    if type(first) is not int or type(count) is not int or first < 0 or count < 1:
        raise PdorchError(ErrorCode.BAD_MESSAGE, "bad array frame reference")
    if first + count > len(aux):
        raise PdorchError(ErrorCode.BAD_MESSAGE, "array refers to a missing frame")
    buf: Any = aux[first] if count == 1 else b"".join(memoryview(aux[i]) for i in range(first, first + count))
    size = memoryview(buf).nbytes
    expected = math.prod(shape) * dtype.itemsize
    if size != expected:
        raise PdorchError(ErrorCode.BAD_MESSAGE, f"array frame holds {size} bytes, header says {expected}")
    arr = np.frombuffer(buf, dtype=dtype)
    return arr if len(shape) == 1 else arr.reshape(shape)


class Encoder:
    """Encodes messages to frames. Not thread-safe (it reuses its aux list per call)."""

    def __init__(self) -> None:
        self._aux: list[Any] = []
        self._enc = msgspec.msgpack.Encoder(enc_hook=self._hook)

    def _hook(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            return _encode_array(obj, self._aux)
        raise NotImplementedError(f"cannot encode {type(obj).__name__}")

    def encode(self, msg: Any) -> list[Any]:
        self._aux = aux = [None]
        aux[0] = self._enc.encode(msg)
        self._aux = []
        return aux


class Decoder(Generic[T]):
    """Decodes frames to one message of type ``union`` (a Struct or a tagged union)."""

    def __init__(self, union: Any) -> None:
        self._aux: Sequence[Any] = ()
        self._dec = msgspec.msgpack.Decoder(union, dec_hook=self._hook)

    def _hook(self, typ: type, obj: Any) -> Any:
        if typ is np.ndarray:
            return _decode_array(obj, self._aux)
        raise NotImplementedError(f"cannot decode {typ}")

    def decode(self, frames: Sequence[Any]) -> T:
        if not frames:
            raise PdorchError(ErrorCode.BAD_MESSAGE, "empty message")
        self._aux = frames
        try:
            return self._dec.decode(frames[0])
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise PdorchError(ErrorCode.BAD_MESSAGE, str(e)) from None
        except NotImplementedError as e:
            raise PdorchError(ErrorCode.BAD_MESSAGE, str(e)) from None
        finally:
            self._aux = ()
