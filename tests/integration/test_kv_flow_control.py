"""Credit-based flow control against a deliberately slow sink.

The sender runs on its own event loop in another thread, so it is free to push as fast as it
can while the receiver's sink dawdles; what it has sent minus what the sink has consumed is the
memory a flood would pile up at the receiver, and it must never exceed the receiver's window.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import zmq.asyncio

from tests.support.kv import p2p
from tests.support.security import INSECURE
from transport.kv import ArraySink, KvReceiver, KvSender
from transport.kv.out_stream import KvOutStream
from transport.messages import KvMode, KvRoute

WINDOW = 256 * 1024
ROWS, ROW_SHAPE = 512, (2, 8, 128)  # 4 KiB rows, 2 MiB per layer
NUM_LAYERS = 4  # 8 MiB in all: 32 windows


class SenderThread(threading.Thread):
    def __init__(self, endpoint: str, layers: np.ndarray) -> None:
        super().__init__(daemon=True)
        self._endpoint = endpoint
        self._layers = layers
        self.stream: KvOutStream | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._send())
        except BaseException as e:
            self.error = e

    async def _send(self) -> None:
        ctx = zmq.asyncio.Context()
        sender = KvSender(ctx, security=INSECURE, max_chunk_bytes=32 * 1024)
        try:
            stream = await sender.open(
                KvRoute(KvMode.P2P, self._endpoint, "slow"),
                num_layers=NUM_LAYERS,
                rows_per_layer=ROWS,
                row_shape=ROW_SHAPE,
                dtype="float16",
                deadline_s=60,
            )
            self.stream = stream
            for layer in range(NUM_LAYERS):
                await stream.send_layer(layer, self._layers[layer])
            await stream.finish({"done": 1})
        finally:
            await sender.close()
            ctx.destroy(linger=0)


class SlowSink(ArraySink):
    def __init__(self, sender: SenderThread) -> None:
        super().__init__(NUM_LAYERS, ROWS, ROW_SHAPE, "float16")
        self._sender = sender
        self.peak_unconsumed = 0

    def write(self, layer: int, row_offset: int, rows: np.ndarray) -> None:
        stream = self._sender.stream
        assert stream is not None
        # Everything the sender has put on the wire that the sink has not yet taken.
        self.peak_unconsumed = max(self.peak_unconsumed, stream.bytes_sent - self.bytes_written)
        time.sleep(0.002)  # the slow part: the receiver's loop is blocked, the sender is not
        super().write(layer, row_offset, rows)


async def test_slow_sink_never_has_more_than_the_window_unconsumed() -> None:
    layers = np.random.default_rng(3).standard_normal((NUM_LAYERS, ROWS, *ROW_SHAPE)).astype(np.float16)
    ctx = zmq.asyncio.Context()
    receiver = KvReceiver(ctx, security=INSECURE, bind="tcp://127.0.0.1:0", window_bytes=WINDOW)
    await receiver.start()
    try:
        sender = SenderThread(receiver.endpoint, layers)
        sink = SlowSink(sender)
        receiving = asyncio.create_task(receiver.receive(p2p("slow"), sink, deadline_s=60))
        sender.start()
        assert await receiving == {"done": 1}
        await asyncio.to_thread(sender.join, 30)
        assert sender.error is None
        assert np.array_equal(sink.layers, layers)
        assert sender.stream is not None
        assert sink.peak_unconsumed <= WINDOW
        assert sender.stream.peak_in_flight <= WINDOW
        # The bound was actually reached (the sender was faster than the sink), so it was tested.
        assert sink.peak_unconsumed > WINDOW // 2
    finally:
        await receiver.close()
        ctx.destroy(linger=0)
