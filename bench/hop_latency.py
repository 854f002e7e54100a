"""What one hop between two processes costs on this machine: a ZeroMQ round trip (DEALER and ROUTER
over TCP loopback, as the control and KV planes use) against a plain TCP socket and a pipe, side by
side in one run.

Each round forks a peer that echoes one-byte messages; the parent times each round trip (send to
reply received) with blocking calls and no Python between them beyond the calls. A ZeroMQ message
crosses three thread wake-ups each way (the sender's I/O thread, the receiver's I/O thread, the
receiving thread) where a socket crosses one, so on a host whose wake-ups are slow (a small VM)
the hops of a request cost more than the work between them. The three kinds are alternated round
by round, so a slow minute of the machine falls on all of them.

Run: ``.venv/bin/python bench/hop_latency.py`` (~5 s).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from collections.abc import Callable

import zmq

WARMUP = 200
# No wait lasts longer than this: a peer that did not start fails the run instead of hanging it.
TIMEOUT_S = 10.0


def _timed(send: Callable[[], object], recv: Callable[[], object], n: int) -> list[float]:
    out = []
    for i in range(n + WARMUP):
        start = time.perf_counter()
        send()
        recv()
        if i >= WARMUP:
            out.append(time.perf_counter() - start)
    return out


def _echo_child(serve: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            serve()
        finally:
            os._exit(0)
    return pid


def pipe_round_trips(n: int) -> list[float]:
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()

    def serve() -> None:
        os.close(from_parent)
        os.close(to_parent)
        for _ in range(n + WARMUP):
            os.write(from_child, os.read(to_child, 1))

    pid = _echo_child(serve)
    os.close(to_child)  # the child's ends: a child that dies is then seen as the end of the pipe
    os.close(from_child)

    def reply() -> None:
        if not os.read(to_parent, 1):
            raise SystemExit("the echoing child went away")

    out = _timed(lambda: os.write(from_parent, b"x"), reply, n)
    os.waitpid(pid, 0)
    os.close(from_parent)
    os.close(to_parent)
    return out


def tcp_round_trips(n: int) -> list[float]:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT_S)
    port = listener.getsockname()[1]

    def serve() -> None:
        conn = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(n + WARMUP):
            conn.sendall(conn.recv(1))

    pid = _echo_child(serve)
    conn, _ = listener.accept()
    conn.settimeout(TIMEOUT_S)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = _timed(lambda: conn.sendall(b"x"), lambda: conn.recv(1), n)
    os.waitpid(pid, 0)
    conn.close()
    listener.close()
    return out


def zmq_round_trips(n: int) -> list[float]:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.RCVTIMEO, int(TIMEOUT_S * 1000))
    port = router.bind_to_random_port("tcp://127.0.0.1")

    def serve() -> None:
        child_ctx = zmq.Context()  # a fresh context: the parent's I/O thread is not in the child
        dealer = child_ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.RCVTIMEO, int(TIMEOUT_S * 1000))
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealer.send(b"hello")
        for _ in range(n + WARMUP):
            dealer.send(dealer.recv())

    pid = _echo_child(serve)
    peer, _ = router.recv_multipart()
    out = _timed(lambda: router.send_multipart([peer, b"x"]), router.recv_multipart, n)
    os.waitpid(pid, 0)
    router.close(linger=0)
    ctx.term()
    return out


KINDS: dict[str, Callable[[int], list[float]]] = {
    "pipe": pipe_round_trips,
    "tcp": tcp_round_trips,
    "zmq": zmq_round_trips,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--round-trips", type=int, default=2000, help="per kind and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    samples: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(args.rounds):
        for kind, run in KINDS.items():
            samples[kind] += run(args.round_trips)
    p50 = {kind: statistics.median(s) * 1e6 for kind, s in samples.items()}
    print(f"Round trips between two processes, {args.rounds} rounds x {args.round_trips} each (us):")
    print(f"{'kind':6s} {'p50':>7s} {'p90':>7s} {'p50 / tcp':>10s}")
    for kind, s in samples.items():
        p90 = statistics.quantiles(s, n=10)[-1] * 1e6
        print(f"{kind:6s} {p50[kind]:7.1f} {p90:7.1f} {p50[kind] / p50['tcp']:9.2f}x")


if __name__ == "__main__":
    main()
