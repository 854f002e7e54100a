"""KV handoff of the simulated engine: a small stand-in through the real KV plane, paced like the real one.

The modeled KV of a prompt is gigabytes; moving that over loopback would measure the loopback, not
the system. Instead a *stand-in* travels through the real KV plane (begin, credit, checksummed
chunks, end, ack): per layer of the modeled model, one ``int32`` row per KV block of the prompt,
holding that block's token ids (``-1`` past the prompt's end) plus ``layer << 16``. The decode side
rebuilds the same rows from the prompt it was given and refuses anything else (``KV_CORRUPT``), so
a stand-in that arrives for the wrong request, layer or block is caught.

The time it takes is the modeled one: the real KV's bytes (prompt tokens x the model's KV bytes per
token) over a link of ``gbytes_per_s``, one transfer at a time per worker NIC (as the cluster
simulator models it); the layers are sent evenly spaced over that time, so the receiver sees a
transfer that progresses as a bandwidth-limited one would. In centralized mode the broker stores
and forwards: the decode side's fetch is a second hop over its own NIC, paced after it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence

import numpy as np

from transport.errors import ErrorCode, PdorchError
from transport.kv import KvReceiver, KvSender
from transport.messages import KvMode, KvRoute

STANDIN_DTYPE = "int32"
_LAYER_SHIFT = 16


def standin_rows(prompt_token_ids: Sequence[int] | np.ndarray, block_size: int) -> np.ndarray:
    """The prompt's token ids as ``[blocks, block_size]`` (layer 0's stand-in)."""
    blocks = -(-len(prompt_token_ids) // block_size)
    rows = np.full(blocks * block_size, -1, dtype=STANDIN_DTYPE)
    rows[: len(prompt_token_ids)] = prompt_token_ids
    return rows.reshape(blocks, block_size)


def standin_layer(base: np.ndarray, layer: int) -> np.ndarray:
    return base + np.int32(layer << _LAYER_SHIFT)


class StandInSink:
    """Receives a stand-in and checks every row against the one rebuilt from the prompt."""

    def __init__(
        self, prompt_token_ids: Sequence[int] | np.ndarray, block_size: int, num_layers: int
    ) -> None:
        self._base = standin_rows(prompt_token_ids, block_size)
        self._num_layers = num_layers
        self.rows_written = 0

    def write(self, layer: int, row_offset: int, rows: np.ndarray) -> None:
        end = row_offset + rows.shape[0]
        if not 0 <= layer < self._num_layers or row_offset < 0 or end > self._base.shape[0]:
            raise PdorchError(
                ErrorCode.KV_CORRUPT, f"stand-in rows out of range: layer {layer} rows {row_offset}+"
            )
        if not np.array_equal(rows, self._base[row_offset:end] + np.int32(layer << _LAYER_SHIFT)):
            raise PdorchError(ErrorCode.KV_CORRUPT, f"stand-in KV of layer {layer} is not this prompt's")
        self.rows_written += rows.shape[0]


class KvLink:
    """One worker's KV link: transfers take turns at ``gbytes_per_s``, durations scaled by
    ``time_scale``. Times are ``time.monotonic()`` seconds."""

    def __init__(self, gbytes_per_s: float, time_scale: float) -> None:
        if not gbytes_per_s > 0:
            raise PdorchError(ErrorCode.CONFIG, f"KV link bandwidth must be positive, got {gbytes_per_s}")
        self._bytes_per_s = gbytes_per_s * 1e9
        self._time_scale = time_scale
        self._free_at = 0.0
        self.bytes_modeled = 0

    def book(self, now: float, nbytes: int) -> tuple[float, float]:
        """Reserve the link for ``nbytes``: returns (start, duration) of the modeled transfer."""
        start = max(now, self._free_at)
        duration = nbytes / self._bytes_per_s * self._time_scale
        self._free_at = start + duration
        self.bytes_modeled += nbytes
        return start, duration


async def _sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def send_standin(
    sender: KvSender,
    route: KvRoute,
    prompt_token_ids: Sequence[int] | np.ndarray,
    first_token: int,
    *,
    num_layers: int,
    block_size: int,
    modeled_bytes: int,
    link: KvLink,
    deadline_s: float,
) -> None:
    """Stream the prompt's stand-in to ``route`` over the modeled transfer time, then the trailer
    with token 0; returns once the receiver confirmed. KV_TIMEOUT past ``deadline_s`` (the stream's
    own deadline, set to the same instant, bounds every wait; the pacing sleeps end there too)."""
    base = standin_rows(prompt_token_ids, block_size)
    now = time.monotonic()
    deadline = now + deadline_s
    start, duration = link.book(now, modeled_bytes)
    if start >= deadline:
        raise PdorchError(ErrorCode.KV_TIMEOUT, f"KV of {route.transfer_id} not delivered in time")
    # Open only when the link is ours: an open transfer that goes quiet looks dead.
    await _sleep_until(start)
    stream = await sender.open(
        route,
        num_layers=num_layers,
        rows_per_layer=base.shape[0],
        row_shape=(block_size,),
        dtype=STANDIN_DTYPE,
        deadline_s=deadline - time.monotonic(),
    )
    try:
        for layer in range(num_layers):
            await _sleep_until(min(deadline, start + duration * (layer + 1) / num_layers))
            await stream.send_layer(layer, standin_layer(base, layer))
        await stream.finish({"first_token": first_token})
    except BaseException:
        # Tells the receiver at once (a no-op if the transfer already ended).
        with contextlib.suppress(Exception):
            await stream.abort("prefill stopped")
        raise


async def receive_standin(
    receiver: KvReceiver,
    route: KvRoute,
    prompt_token_ids: Sequence[int] | np.ndarray,
    *,
    num_layers: int,
    block_size: int,
    modeled_bytes: int,
    link: KvLink,
    deadline_s: float,
    on_arriving: Callable[[], None] | None = None,
) -> int:
    """Receive (p2p) or fetch (centralized) the prompt's stand-in, verify it; returns token 0."""
    sink = StandInSink(prompt_token_ids, block_size, num_layers)
    deadline = time.monotonic() + deadline_s
    # KV_TIMEOUT past the deadline.
    trailer = await receiver.receive(route, sink, deadline_s=deadline_s, on_arriving=on_arriving)
    if route.mode == KvMode.CENTRALIZED:
        start, duration = link.book(time.monotonic(), modeled_bytes)  # the broker's second hop
        await _sleep_until(min(deadline, start + duration))
        if start + duration > deadline:
            raise PdorchError(ErrorCode.KV_TIMEOUT, f"KV of {route.transfer_id} not received in time")
    first = trailer.get("first_token")
    if not isinstance(first, int):
        raise PdorchError(ErrorCode.KV_CORRUPT, "KV trailer carries no first token")
    return first
