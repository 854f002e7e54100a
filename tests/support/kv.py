"""Helpers shared by the KV-plane tests: layer data, a whole-transfer send, polling a condition,
a receiver running for a block."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import zmq.asyncio

from tests.support.security import INSECURE
from transport.kv import KvReceiver, KvSender
from transport.messages import KvMode, KvRoute


def p2p(transfer_id: str) -> KvRoute:
    """The decode side's route of a p2p transfer (it receives on its own endpoint)."""
    return KvRoute(KvMode.P2P, "", transfer_id)


def via_broker(broker: str, transfer_id: str) -> KvRoute:
    return KvRoute(KvMode.CENTRALIZED, broker, transfer_id)


def make_layers(
    num_layers: int, rows: int, row_shape: tuple[int, ...], dtype: str, seed: int = 0
) -> np.ndarray:
    values = np.random.default_rng(seed).standard_normal((num_layers, rows, *row_shape)) * 10
    return values.astype(dtype)


async def send_all(
    sender: KvSender, route: KvRoute, layers: np.ndarray, trailer: dict[str, int | str], deadline_s: float
) -> None:
    """Open a transfer for ``layers``, send every layer, finish with ``trailer``."""
    stream = await sender.open(
        route,
        num_layers=layers.shape[0],
        rows_per_layer=layers.shape[1],
        row_shape=layers.shape[2:],
        dtype=layers.dtype.name,
        deadline_s=deadline_s,
    )
    for layer in range(layers.shape[0]):
        await stream.send_layer(layer, layers[layer])
    await stream.finish(trailer)


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0, poll_s: float = 0.01) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not condition():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(poll_s)


@contextlib.asynccontextmanager
async def started_receiver(ctx: zmq.asyncio.Context, **limits: Any) -> AsyncIterator[KvReceiver]:
    """An insecure p2p receiver on a free loopback port (``limits``: KvReceiver's keywords)."""
    rx = KvReceiver(ctx, security=INSECURE, bind="tcp://127.0.0.1:0", **limits)
    await rx.start()
    try:
        yield rx
    finally:
        await rx.close()
