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

from transport import sockets
from transport.errors import PdorchError
from transport.kv.broker import KvBroker
from transport.process_setup import setup_process
from transport.security import Security, SecurityConfig
from transport.security import config as security_config

log = logging.getLogger("pdorch.kv_broker")
MIB = 1024 * 1024
# The readiness line's prefix; the endpoint follows it.
LISTENING = "kv-broker listening on "


def listening_endpoint(line: str) -> str | None:
    """The endpoint a broker's readiness line names (None if ``line`` is not that line)."""
    return line[len(LISTENING) :].strip() if line.startswith(LISTENING) else None


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pdorch kv-broker", description="Run the centralized KV broker.")
    parser.add_argument("--bind", default="tcp://0.0.0.0:5700", help="ZeroMQ endpoint to bind (port 0: any)")
    parser.add_argument("--capacity-mb", type=int, default=4096, help="bytes of KV held at most, in MiB")
    parser.add_argument("--ttl-s", type=float, default=120.0, help="evict a transfer unclaimed this long")
    parser.add_argument("--window-mb", type=int, default=32, help="credit granted per inbound transfer, MiB")
    parser.add_argument(
        "--max-sender-mb",
        type=int,
        default=0,
        help="KV one sender (connection) may hold, MiB (default: half of --capacity-mb)",
    )
    parser.add_argument(
        "--first-chunk-s",
        type=float,
        default=5.0,
        help="free a transfer whose sender sends no chunk within this long of its begin",
    )
    parser.add_argument(
        "--idle-s", type=float, default=10.0, help="free a transfer whose sender goes quiet this long"
    )
    parser.add_argument(
        "--max-fetch-wait-s",
        type=float,
        default=60.0,
        help="longest a fetch may take (waiting for its transfer, then streaming it), whatever it asks",
    )
    parser.add_argument(
        "--max-fetches-per-peer", type=int, default=64, help="fetches one peer may have waiting or running"
    )
    parser.add_argument(
        "--max-waiting-fetches", type=int, default=4096, help="fetches waiting for their transfer, in all"
    )
    parser.add_argument(
        "--stats-interval-s", type=float, default=60.0, help="log the broker's counters this often"
    )
    parser.add_argument("--log-level", default="INFO")
    security_config.add_arguments(parser)
    args = parser.parse_args(argv)
    positive = (
        "capacity_mb",
        "ttl_s",
        "window_mb",
        "first_chunk_s",
        "idle_s",
        "max_fetch_wait_s",
        "stats_interval_s",
    )
    positive += ("max_fetches_per_peer", "max_waiting_fetches")
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.max_sender_mb < 0:
        parser.error("--max-sender-mb must not be negative")
    try:
        args.security = security_config.from_args(args)
    except PdorchError as e:
        parser.error(e.message)
    return args


async def _serve(args: argparse.Namespace) -> None:
    security_cfg: SecurityConfig = args.security
    security = Security.load(security_cfg)
    ctx = sockets.new_context()
    broker = KvBroker(
        ctx,
        bind=args.bind,
        security=security,
        capacity_bytes=args.capacity_mb * MIB,
        ttl_s=args.ttl_s,
        window_bytes=args.window_mb * MIB,
        max_sender_bytes=args.max_sender_mb * MIB,
        first_chunk_s=args.first_chunk_s,
        idle_s=args.idle_s,
        max_fetch_wait_s=args.max_fetch_wait_s,
        max_fetches_per_peer=args.max_fetches_per_peer,
        max_waiting_fetches=args.max_waiting_fetches,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await broker.start()
        print(f"{LISTENING}{broker.endpoint}", flush=True)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(args.stats_interval_s):
                    await stop.wait()
            log.info("stats %s", broker.stats)
    finally:
        await broker.close()
        security.close()
        ctx.destroy(linger=0)


def broker_main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    setup_process(args.log_level)
    try:
        asyncio.run(_serve(args))
    except PdorchError as e:  # keys that do not load, a bind that fails
        log.error("%s", e.message)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(broker_main())
