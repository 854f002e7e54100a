"""KV-plane messages: one tagged union, :data:`KvMessage`, used in both directions.

A transfer moves the KV of one request, identified by its ``transfer_id``, from a sender (a
prefill agent, or the KV broker serving a fetch) to a receiver (a decode agent, or the KV broker
storing it). The order of messages and the failure rules are in ``transport/PROTOCOL.md``.

The row payload of a :class:`KvChunk` is a numpy array; the codec carries it as a zero-copy aux
frame. Structs are ``array_like``, ``omit_defaults`` and ``gc=False`` like the control plane's.
Fields are only ever appended with defaults; anything an old peer cannot decode, or would read
differently, bumps :data:`KV_PROTOCOL_VERSION`, which travels in the first message of every
transfer (``KvBegin``, ``KvFetch``).
"""

from __future__ import annotations

import msgspec
import numpy as np

from transport.errors import ErrorCode, PdorchError

KV_PROTOCOL_VERSION = 5
# The checksum of protocol versions 2 to 5 (see checksum.py): one per span of a chunk's rows.
CHECKSUM_ALGORITHM = "xxh3_64"
# The most row payload an eager transfer (``KvBegin.eager``) may carry: a receiver refuses a larger
# one (``bad_message``). What a sender wastes when its eager transfer is turned away, and what a
# receiver may be sent unasked per eager begin.
EAGER_MAX_BYTES = 1024 * 1024

_STRUCT = {"array_like": True, "omit_defaults": True, "gc": False, "tag_field": "t"}


class KvBegin(msgspec.Struct, tag="begin", **_STRUCT):
    """Sender -> receiver, first message of a transfer: what will come. Nothing else is sent
    until the receiver answers :class:`KvAccept` (unless ``eager``)."""

    version: int
    transfer_id: str
    num_layers: int
    rows_per_layer: int
    row_shape: list[int]
    dtype: str
    # Rows covered by each checksum of a chunk (see checksum.py); at least ``min_checksum_rows``.
    checksum_rows: int
    # The sender's host identity (same_host/identity.py) when it can take a shared-memory ring; "" not.
    host: str = ""
    # Eager (MPI's eager protocol, for transfers of at most EAGER_MAX_BYTES): the whole transfer,
    # chunks and end, follows at once on the socket without waiting for an accept, and the receiver
    # sends none. One that must wait (not expected yet, no slot) waits with what follows it, held,
    # within a bound of bytes in all; past it the begin is refused with ``kv_not_ready`` and the
    # sender begins again the usual way. Saves the accept's round trip on every small handoff.
    eager: bool = False


class KvShmRing(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A receiver's shared-memory ring, offered to a sender on its host: the memfd ``fd`` of process
    ``pid`` (inode ``inode``), ``slots`` slots of ``slot_bytes`` each. See ``same_host/``."""

    pid: int
    fd: int
    inode: int
    slots: int
    slot_bytes: int


class KvAccept(msgspec.Struct, tag="accept", **_STRUCT):
    """Receiver -> sender: go ahead; the first grant of credit, in bytes of row payload. ``ring``:
    the sender may write its chunks into this shared ring (:class:`KvShmChunk`) instead of sending
    them; the window is then the ring, and a chunk takes the credit of its place in it."""

    transfer_id: str
    credit_bytes: int
    ring: KvShmRing | None = None


class KvCredit(msgspec.Struct, tag="credit", **_STRUCT):
    """Receiver -> sender: ``credit_bytes`` more may be in flight (the receiver consumed them)."""

    transfer_id: str
    credit_bytes: int


class KvChunk(msgspec.Struct, tag="chunk", **_STRUCT):
    """Sender -> receiver: ``rows`` of ``layer`` starting at ``row_offset``.

    ``seq`` counts chunks from 0 within the transfer (a gap means a lost chunk); ``checksums`` holds
    the xxh3-64 of the bytes of each span of ``checksum_rows`` rows (from the begin message) of
    ``rows``, in order; the last span may be shorter."""

    transfer_id: str
    seq: int
    layer: int
    row_offset: int
    checksums: list[int]
    rows: np.ndarray


class KvShmChunk(msgspec.Struct, tag="shm_chunk", **_STRUCT):
    """Sender -> receiver: a :class:`KvChunk` whose ``rows`` rows were written into the ring the
    receiver offered, rather than sent: right after the transfer's previous chunk, or at the
    start of the ring if they would run past its end (``same_host/ring.py``, ``place``)."""

    transfer_id: str
    seq: int
    layer: int
    row_offset: int
    checksums: list[int]
    rows: int


class KvEnd(msgspec.Struct, tag="end", **_STRUCT):
    """Sender -> receiver, last message: the totals the receiver checks, and the trailer (e.g. the
    first token) that the decode side needs."""

    transfer_id: str
    chunks: int
    payload_bytes: int
    layer_rows: list[int]
    trailer: dict[str, int | str] = {}


class KvAck(msgspec.Struct, tag="ack", **_STRUCT):
    """Receiver -> sender: the whole transfer arrived and verified; the sender may forget it."""

    transfer_id: str


class KvNack(msgspec.Struct, tag="nack", **_STRUCT):
    """Receiver -> sender (or broker -> fetcher): the transfer failed; ``code`` is an ErrorCode value."""

    transfer_id: str
    code: str
    message: str = ""


class KvAbort(msgspec.Struct, tag="abort", **_STRUCT):
    """Sender -> receiver (or fetcher -> broker): give up this transfer, free what it holds."""

    transfer_id: str
    reason: str = ""


class KvFetch(msgspec.Struct, tag="fetch", **_STRUCT):
    """Decode side -> broker: stream ``transfer_id`` to me (as it arrives, if it is still arriving);
    wait for it to begin at most ``wait_ms``. The broker answers with a :class:`KvBegin` (and then
    acts as a sender) or a :class:`KvNack`."""

    version: int
    transfer_id: str
    wait_ms: int


class KvPing(msgspec.Struct, tag="ping", **_STRUCT):
    """Anyone -> broker: are you there? The broker answers :class:`KvPong` at once. (Every KV message
    names a transfer; a ping names none, so whoever gets one by mistake drops it as unknown.)"""

    version: int
    nonce: int
    transfer_id: str = ""


class KvPong(msgspec.Struct, tag="pong", **_STRUCT):
    """Broker -> pinger. ``instance`` is drawn at the broker's start: when it changes, the broker
    restarted and whatever it held or was receiving is gone."""

    nonce: int
    instance: str
    transfer_id: str = ""


KvMessage = (
    KvBegin
    | KvAccept
    | KvCredit
    | KvChunk
    | KvShmChunk
    | KvEnd
    | KvAck
    | KvNack
    | KvAbort
    | KvFetch
    | KvPing
    | KvPong
)


def nack_error(nack: KvNack) -> PdorchError:
    """The error a nack stands for (``INTERNAL`` for a code this version does not know)."""
    try:
        code = ErrorCode(nack.code)
    except ValueError:
        code = ErrorCode.INTERNAL
    return PdorchError(code, f"transfer {nack.transfer_id} refused by the peer: {nack.message}")
