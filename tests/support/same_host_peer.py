"""One side of a KV transfer in a process of its own, for the same-host tests (kill it mid-transfer).

``send ENDPOINT TRANSFER_ID MODE SEED [--hold-after N] [--layers L --rows R --row-shape A,B,C
--dtype D]``: send ``kv_layers(SEED)`` (or layers of that geometry) with a KvSender in same-host
mode MODE and print the outcome (``ok`` or the error code); with ``--hold-after N``, print
``holding`` after N layers and wait to be killed.
``receive MODE``: bind a KvReceiver, print its endpoint, take transfer ``t`` into a sink that prints
``writing`` at its first rows and then never returns.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading

import numpy as np
import zmq.asyncio

from tests.support.kv import make_layers
from transport.errors import PdorchError
from transport.kv import KvReceiver, KvSender
from transport.kv.same_host import SameHostMode
from transport.messages import KvMode, KvRoute
from transport.security import Security

ROW_SHAPE = (2, 8, 128)  # 4 KiB rows of float16
NUM_LAYERS = 4
ROWS = 2048  # 8 MiB per layer: two 4 MiB slots, each chunk 8 checksum spans


def kv_layers(seed: int) -> np.ndarray:
    return make_layers(NUM_LAYERS, ROWS, ROW_SHAPE, "float16", seed)


async def send(
    endpoint: str, transfer_id: str, mode: SameHostMode, layers: np.ndarray, hold_after: int | None
) -> None:
    ctx = zmq.asyncio.Context()
    sender = KvSender(ctx, security=Security.insecure(), same_host=mode)
    try:
        stream = await sender.open(
            KvRoute(KvMode.P2P, endpoint, transfer_id),
            num_layers=layers.shape[0],
            rows_per_layer=layers.shape[1],
            row_shape=layers.shape[2:],
            dtype=layers.dtype.name,
            deadline_s=60,
        )
        for layer in range(layers.shape[0]):
            if layer == hold_after:
                print("holding", flush=True)
                await asyncio.Event().wait()
            await stream.send_layer(layer, layers[layer])
        await stream.finish({"first_token": 1})
        print("ok" if stream.used_ring or mode == SameHostMode.OFF else "ok-without-ring", flush=True)
    except PdorchError as e:
        print(e.code, flush=True)
    finally:
        await sender.close()
        ctx.destroy(linger=0)


class _StuckSink:
    def write(self, layer: int, row_offset: int, rows: np.ndarray) -> None:
        print("writing", flush=True)
        threading.Event().wait()


async def receive(mode: SameHostMode) -> None:
    ctx = zmq.asyncio.Context()
    receiver = KvReceiver(ctx, bind="tcp://127.0.0.1:0", security=Security.insecure(), same_host=mode)
    await receiver.start()
    print(receiver.endpoint, flush=True)
    await receiver.receive(KvRoute(KvMode.P2P, "", "t"), _StuckSink(), deadline_s=600)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("send")
    s.add_argument("endpoint")
    s.add_argument("transfer_id")
    s.add_argument("mode", type=SameHostMode)
    s.add_argument("seed", type=int)
    s.add_argument("--hold-after", type=int, default=None)
    s.add_argument("--layers", type=int, default=NUM_LAYERS)
    s.add_argument("--rows", type=int, default=ROWS)
    s.add_argument("--row-shape", default=",".join(map(str, ROW_SHAPE)))
    s.add_argument("--dtype", default="float16")
    r = sub.add_parser("receive")
    r.add_argument("mode", type=SameHostMode)
    args = parser.parse_args()
    if args.command == "send":
        shape = tuple(int(d) for d in args.row_shape.split(","))
        layers = make_layers(args.layers, args.rows, shape, args.dtype, args.seed)
        asyncio.run(send(args.endpoint, args.transfer_id, args.mode, layers, args.hold_after))
    else:
        asyncio.run(receive(args.mode))


if __name__ == "__main__":
    sys.exit(main())
