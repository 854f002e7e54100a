"""``pdorch kv-broker``: run a KV broker until SIGTERM or SIGINT.

Also runnable as ``python -m transport.kv.broker_cli``. Prints one line,
``kv-broker listening on <endpoint>``, once it is bound (with the real port when bound to port 0),
so a supervisor or a test can wait for readiness and learn the address.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

import zmq.asyncio

from transport.kv.broker import KvBroker
from transport.process_setup import setup_process

log = logging.getLogger("pdorch.kv_broker")
MIB = 1024 * 1024
STATS_LOG_INTERVAL_S = 60.0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pdorch kv-broker", description="Run the centralized KV broker.")
    parser.add_argument("--bind", default="tcp://0.0.0.0:5700", help="ZeroMQ endpoint to bind (port 0: any)")
    parser.add_argument("--capacity-mb", type=int, default=4096, help="bytes of KV held at most, in MiB")
    parser.add_argument("--ttl-s", type=float, default=120.0, help="evict a transfer unclaimed this long")
    parser.add_argument("--window-mb", type=int, default=32, help="credit granted per inbound transfer, MiB")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if args.capacity_mb <= 0 or args.ttl_s <= 0 or args.window_mb <= 0:
        parser.error("--capacity-mb, --ttl-s and --window-mb must be positive")
    return args


async def _serve(args: argparse.Namespace) -> None:
    ctx = zmq.asyncio.Context()
    broker = KvBroker(
        ctx,
        bind=args.bind,
        capacity_bytes=args.capacity_mb * MIB,
        ttl_s=args.ttl_s,
        window_bytes=args.window_mb * MIB,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await broker.start()
        print(f"kv-broker listening on {broker.endpoint}", flush=True)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), STATS_LOG_INTERVAL_S)
            log.info("stats %s", broker.stats)
    finally:
        await broker.close()
        ctx.destroy(linger=0)


def broker_main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    setup_process(args.log_level)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(broker_main())
