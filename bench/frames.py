"""The cost of one multipart message through pyzmq's ``send_multipart``/``recv_multipart`` against
``transport.frames`` (the same C calls with plain integer flags), side by side in one run.

A ROUTER and a DEALER on TCP loopback in one process, messages shaped like the control plane's (a
routing id, a type tag, a body of ~100 bytes): each round sends and receives ``--messages`` with one
way, then the other, alternating which goes first; CPU time per message (send + receive, both
sides in this process). The sockets do the same I/O either way, so the difference is the Python
around the calls.

Run: ``.venv/bin/python bench/frames.py`` (~10 s).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from transport.frames import NOBLOCK, recv_frames, send_frames

# Messages in flight at once: a receive then rarely waits for the I/O thread, so what is timed is
# the calls, not a round trip's wake-ups.
BATCH = 100


def _pyzmq(router: zmq.Socket, dealer: zmq.Socket, body: list[bytes], n: int) -> None:
    for _ in range(n // BATCH):
        for _ in range(BATCH):
            dealer.send_multipart(body, zmq.NOBLOCK, copy=False)
        for _ in range(BATCH):
            frames = router.recv_multipart(copy=False)
            router.send_multipart([frames[0], *body], zmq.NOBLOCK, copy=False)
        for _ in range(BATCH):
            dealer.recv_multipart(copy=False)


def _frames(router: zmq.Socket, dealer: zmq.Socket, body: list[bytes], n: int) -> None:
    for _ in range(n // BATCH):
        for _ in range(BATCH):
            send_frames(dealer, body, NOBLOCK)
        for _ in range(BATCH):
            frames = recv_frames(router)
            send_frames(router, [frames[0], *body], NOBLOCK)
        for _ in range(BATCH):
            recv_frames(dealer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000, help="per way and round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for s in (router, dealer):
        s.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.setsockopt(zmq.IDENTITY, b"peer")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    body = [b"token", b"x" * 100]
    _pyzmq(router, dealer, body, 1000)  # connect and warm up
    ways = {"pyzmq multipart": _pyzmq, "transport.frames": _frames}
    per_message: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(args.rounds):
        order = list(ways) if r % 2 == 0 else list(reversed(ways))
        for name in order:
            start = time.process_time()
            ways[name](router, dealer, body, args.messages)
            # Two messages per iteration (there and back), each sent and received here.
            per_message[name].append((time.process_time() - start) / (2 * args.messages) * 1e6)
    base = statistics.median(per_message["pyzmq multipart"])
    print("| way | CPU us per message (send + receive), median | ratio |")
    print("|---|---|---|")
    for name, values in per_message.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {median / base:.2f} |")
    router.close()
    dealer.close()
    ctx.term()


if __name__ == "__main__":
    main()
