"""KV handoff throughput: pdorch's KV plane against memcpy and raw pyzmq, measured in one run.

Hands off the KV of a Llama-3-8B-shaped request (32 layers of ``[T, 2, 8, 128]`` fp16: 128 KiB
per token) at several prompt lengths, with the sender, the receiver and (centralized mode) the
broker each in its own OS process, as in production. pdorch's KV plane runs as configured in
production too: ``p2p`` and ``central`` with no authentication (the transport alone), ``p2p+auth``
authenticated by ZAP without encrypting the payload (``kv_payload: plaintext``) and ``p2p+curve``
CURVE-encrypted (``kv_payload: encrypted``), which is what authentication costs. Baselines, measured
in the same run:

- memcpy: ``np.copyto`` of the same bytes, layer by layer (the floor of any handoff);
- raw pyzmq: a PUSH process sending the same frames (chunks of ``--chunk-mb``) with ``copy=False``
  to a PULL process over tcp loopback, which receives them and does nothing else;
- raw+work: the same, plus the work any verified handoff into a KV cache does: the sender
  checksums each frame's spans, the receiver checksums each span and copies it into a
  preallocated destination. No protocol: what is left between it and p2p is pdorch's own cost.

``same-host`` is pdorch's p2p handoff between the same two processes with the same-host path
forced on: the sender writes each chunk into the receiver's shared ring (no socket on the data
path), the receiver verifies it and copies it into the same preallocated destination. The ``p2p``
column forces the path off, so it stays the TCP handoff.

The p2p receiver writes every row into a preallocated destination (as an engine writes into its
KV cache): one more memcpy than raw pyzmq does. ``p2p-discard`` is the same transfer into a sink
that drops the rows, i.e. the transport alone. Centralized is end to end: the decode side asks the
broker as the prefill side starts sending; the broker forwards chunks as they arrive (cut-through).

Run: ``.venv/bin/python bench/kv_handoff.py`` (``--help`` for options; ``make bench`` runs it).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import zmq
import zmq.asyncio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from transport import sockets
from transport.kv import ArraySink, KvReceiver, KvSender
from transport.kv.broker_cli import listening_endpoint
from transport.kv.checksum import checksum, checksum_rows_for, span_checksums
from transport.kv.receive_buffers import keep_receive_buffers
from transport.kv.same_host import SameHostMode
from transport.messages import KvMode, KvRoute
from transport.security import KvPayload, Security, SecurityConfig
from transport.security.key_set import KeySet

REPO_ROOT = Path(__file__).resolve().parents[1]
LAYERS = 32
ROW_SHAPE = (2, 8, 128)
DTYPE = "float16"
MIB = 1024 * 1024
TOKEN_BYTES = LAYERS * 2 * 8 * 128 * 2  # 128 KiB


def make_layers(tokens: int) -> np.ndarray:
    """Deterministic non-trivial content without paying for a normal distribution over 1 GiB."""
    raw = np.random.default_rng(tokens).integers(0, 2**16, size=(LAYERS, tokens, *ROW_SHAPE), dtype=np.uint16)
    return raw.view(np.float16)


def run_loop(main: Callable[[], Any]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


async def recv_command(conn: Connection) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, conn.recv)


# ----------------------------------------------------------------------------- pdorch processes


class Party(NamedTuple):
    """Who a bench process is on the KV plane: a key of a key set, and the payload mode."""

    keys_dir: str
    name: str
    payload: str


def security_of(party: Party | None) -> Security:
    if party is None:
        return Security.insecure()
    keys = KeySet(Path(party.keys_dir))
    cfg = SecurityConfig(
        key_file=str(keys.key_file(party.name)),
        trusted_keys=str(keys.trusted_dir),
        kv_payload=KvPayload(party.payload),
    )
    return Security.load(cfg)


class DiscardSink:
    def write(self, layer: int, row_offset: int, rows: np.ndarray) -> None:
        pass


def receiver_process(
    conn: Connection, window_mb: int, ring_slots: int, ring_slot_mb: int, party: Party | None
) -> None:
    async def main() -> None:
        ctx = sockets.new_context()
        security = security_of(party)
        receiver = KvReceiver(
            ctx,
            security=security,
            bind="tcp://127.0.0.1:0",
            window_bytes=window_mb * MIB,
            ring_slots=ring_slots,
            ring_slot_bytes=ring_slot_mb * MIB,
        )
        await receiver.start()
        conn.send(receiver.endpoint)
        sinks: dict[int, ArraySink] = {}
        while (cmd := await recv_command(conn)) is not None:
            kind, tid, tokens, broker = cmd
            if kind == "discard":
                sink: Any = DiscardSink()
            else:
                sink = sinks.get(tokens)
                if sink is None:  # a KV cache is allocated (and paged in) before requests arrive
                    sink = sinks[tokens] = ArraySink(LAYERS, tokens, ROW_SHAPE, DTYPE)
                    sink.layers.fill(0)
            conn.send("ready")
            mode = KvMode.CENTRALIZED if broker else KvMode.P2P
            await receiver.receive(KvRoute(mode, broker, tid), sink, deadline_s=120)
            done = time.perf_counter()
            digest = checksum(sink.layers) if kind == "verify" else 0
            conn.send((done, digest))
        await receiver.close()
        security.close()
        ctx.destroy(linger=0)

    run_loop(main)


def sender_process(conn: Connection, chunk_mb: int, party: Party | None, server_key: str) -> None:
    """``server_key``: the receiver's public key, pinned as the scheduler's routes do."""

    async def main() -> None:
        ctx = sockets.new_context()
        security = security_of(party)
        senders = {
            shared: KvSender(
                ctx,
                security=security,
                max_chunk_bytes=chunk_mb * MIB,
                same_host=SameHostMode.ON if shared else SameHostMode.OFF,
            )
            for shared in (False, True)
        }
        data: dict[int, np.ndarray] = {}
        conn.send("up")
        while (cmd := await recv_command(conn)) is not None:
            tid, tokens, mode, endpoint, verify, shared = cmd
            sender = senders[shared]
            if tokens not in data:
                data[tokens] = make_layers(tokens)
            layers = data[tokens]
            conn.send(checksum(layers) if verify else 0)
            await recv_command(conn)  # go
            start = time.perf_counter()
            stream = await sender.open(
                KvRoute(mode, endpoint, tid, server_key if mode == "p2p" else ""),
                num_layers=LAYERS,
                rows_per_layer=tokens,
                row_shape=ROW_SHAPE,
                dtype=DTYPE,
                deadline_s=120,
            )
            for layer in range(LAYERS):
                await stream.send_layer(layer, layers[layer])
            await stream.finish({"first_token": 1})
            conn.send((start, time.perf_counter()))
        for sender in senders.values():
            await sender.close()
        security.close()
        ctx.destroy(linger=0)

    run_loop(main)


# ----------------------------------------------------------------------------- raw pyzmq processes


ROW_BYTES = 2 * 8 * 128 * 2
SPAN_ROWS = checksum_rows_for(ROW_BYTES)


def raw_receiver_process(conn: Connection) -> None:
    keep_receive_buffers()  # as pdorch's receiver does: both sides get the same allocator
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    conn.send(f"tcp://127.0.0.1:{port}")
    sock.recv()  # warm-up: the connection exists before anything is timed
    destinations: dict[int, np.ndarray] = {}
    while (cmd := conn.recv()) is not None:
        frames, total_bytes, work = cmd
        if work and total_bytes not in destinations:
            destinations[total_bytes] = np.ones(total_bytes // 2, np.float16)  # paged in
        dst = destinations.get(total_bytes)
        conn.send("ready")
        offset = 0
        for _ in range(frames):
            frame = sock.recv(copy=False)
            if dst is None:
                continue
            rows = np.frombuffer(frame.buffer, np.float16).reshape(-1, ROW_BYTES // 2)
            out = dst[offset : offset + rows.size].reshape(rows.shape)
            for start in range(0, rows.shape[0], SPAN_ROWS):  # verify a span, then copy it
                checksum(rows[start : start + SPAN_ROWS])
                out[start : start + SPAN_ROWS] = rows[start : start + SPAN_ROWS]
            offset += rows.size
        conn.send(time.perf_counter())
    ctx.destroy(linger=0)


def raw_sender_process(conn: Connection, endpoint: str, chunk_mb: int) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send(b"warm-up")
    data: dict[int, list[np.ndarray]] = {}
    conn.send("up")
    while (cmd := conn.recv()) is not None:
        tokens, work = cmd
        if tokens not in data:
            layers = make_layers(tokens)
            per = max(1, chunk_mb * MIB // (layers[0, 0].nbytes))
            data[tokens] = [layers[i, s : s + per] for i in range(LAYERS) for s in range(0, tokens, per)]
        frames = data[tokens]
        conn.send(len(frames))
        conn.recv()  # go
        start = time.perf_counter()
        for frame in frames:
            if work:
                span_checksums(frame, SPAN_ROWS)
            sock.send(frame, copy=False)
        conn.send(start)
    ctx.destroy(linger=0)


# ----------------------------------------------------------------------------- orchestration


class Pair:
    """A receiving and a sending worker process, driven over pipes."""

    def __init__(
        self, receiver: tuple[mp.Process, Connection], sender: tuple[mp.Process, Connection]
    ) -> None:
        (self.rx_proc, self.rx), (self.tx_proc, self.tx) = receiver, sender

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in (self.rx_proc, self.tx_proc) if p.pid is not None]

    def stop(self) -> None:
        for conn in (self.rx, self.tx):
            conn.send(None)
        for proc in (self.rx_proc, self.tx_proc):
            proc.join(30)
            if proc.is_alive():
                proc.kill()


def spawn(target: Callable[..., None], *args: Any) -> tuple[mp.Process, Connection]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args), daemon=True)
    proc.start()
    return proc, parent


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (all their threads) so far."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


class Sample(NamedTuple):
    seconds: float
    cpu_seconds: float


def memcpy_run(src: np.ndarray, dst: np.ndarray) -> Sample:
    start, cpu = time.perf_counter(), time.process_time()
    for layer in range(LAYERS):
        np.copyto(dst[layer], src[layer])
    return Sample(time.perf_counter() - start, time.process_time() - cpu)


def raw_run(raw: Pair, tokens: int, work: bool = False) -> Sample:
    raw.tx.send((tokens, work))
    frames = raw.tx.recv()
    raw.rx.send((frames, tokens * TOKEN_BYTES, work))
    assert raw.rx.recv() == "ready"
    cpu = cpu_seconds(raw.pids)
    raw.tx.send("go")
    start = raw.tx.recv()
    end = raw.rx.recv()
    return Sample(end - start, cpu_seconds(raw.pids) - cpu)


def kv_run(
    kv: Pair,
    tokens: int,
    tid: str,
    kind: str,
    endpoint: str,
    broker: str,
    pids: list[int],
    shared: bool = False,
) -> Sample:
    """One handoff; ``kind`` "verify" also checks that the receiver holds exactly what was sent;
    ``shared``: through the same-host path (p2p only)."""
    kv.tx.send((tid, tokens, "centralized" if broker else "p2p", endpoint, kind == "verify", shared))
    sent_digest = kv.tx.recv()
    kv.rx.send((kind, tid, tokens, broker))
    assert kv.rx.recv() == "ready"
    cpu = cpu_seconds(pids)
    kv.tx.send("go")
    start, _ = kv.tx.recv()
    end, got_digest = kv.rx.recv()
    used = cpu_seconds(pids) - cpu
    if kind == "verify" and got_digest != sent_digest:
        raise SystemExit(f"{tid}: the received KV differs from what was sent")
    return Sample(end - start, used)


def start_broker(window_mb: int) -> tuple[subprocess.Popen[str], str]:
    # The transport alone (the authenticated modes are measured p2p).
    command = [sys.executable, "-m", "transport.kv.broker_cli", "--bind", "tcp://127.0.0.1:0", "--insecure"]
    command += [
        "--capacity-mb",
        "4096",
        "--ttl-s",
        "300",
        "--window-mb",
        str(window_mb),
        "--log-level",
        "WARNING",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    endpoint = listening_endpoint(line)
    if endpoint is None:
        proc.kill()
        raise SystemExit(f"broker did not start: {line!r}")
    return proc, endpoint


METHODS = ("memcpy", "raw", "raw+work", "p2p", "p2p-discard", "central", "same-host", "p2p+auth", "p2p+curve")
WIDTHS = (6, 5, 7, 7, 13, 13, 13, 13, 17, 13, 13, 7, 7, 7, 7, 7, 9, 7, 7)
SENDER, RECEIVER = "bench-prefill", "bench-decode"


class Secured(NamedTuple):
    """A sending and receiving pair authenticated on the KV plane, and the receiver's endpoint."""

    pair: Pair
    endpoint: str
    scope: str  # transfer ids start with it: the sender's key name


def secured_pair(keys: KeySet, payload: KvPayload, args: argparse.Namespace) -> Secured:
    party = Party(str(keys.directory), RECEIVER, payload.value)
    proc, conn = spawn(receiver_process, args.window_mb, args.ring_slots, args.ring_slot_mb, party)
    endpoint = conn.recv()
    server_key = keys.public_key(RECEIVER)
    sender = spawn(
        sender_process, args.chunk_mb, Party(str(keys.directory), SENDER, payload.value), server_key
    )
    pair = Pair((proc, conn), sender)
    assert pair.tx.recv() == "up"
    return Secured(pair, endpoint, SENDER + "/")


def measure_size(
    tokens: int,
    repeats: int,
    raw: Pair,
    kv: Pair,
    kv_endpoint: str,
    broker: str,
    broker_pid: int,
    secured: dict[str, Secured],
) -> dict[str, list[Sample]]:
    """Every method once per round, rounds repeated: a burst of load elsewhere hits all methods alike."""
    src = make_layers(tokens)
    dst = np.ones_like(src)
    samples: dict[str, list[Sample]] = {m: [] for m in METHODS}
    # Warm-up (not counted): data built in every process, connections up, destinations paged in;
    # the first p2p and centralized handoffs are checked for content.
    raw_run(raw, tokens)
    raw_run(raw, tokens, work=True)
    kv_run(kv, tokens, f"warm-p2p-{tokens}", "verify", kv_endpoint, "", kv.pids)
    kv_run(kv, tokens, f"warm-central-{tokens}", "verify", broker, broker, [*kv.pids, broker_pid])
    kv_run(kv, tokens, f"warm-shared-{tokens}", "verify", kv_endpoint, "", kv.pids, shared=True)
    for m, sec in secured.items():
        kv_run(sec.pair, tokens, f"{sec.scope}warm-{m}-{tokens}", "verify", sec.endpoint, "", sec.pair.pids)
    for r in range(repeats):
        samples["memcpy"].append(memcpy_run(src, dst))
        samples["raw"].append(raw_run(raw, tokens))
        samples["raw+work"].append(raw_run(raw, tokens, work=True))
        samples["p2p"].append(kv_run(kv, tokens, f"p2p-{tokens}-{r}", "copy", kv_endpoint, "", kv.pids))
        samples["p2p-discard"].append(
            kv_run(kv, tokens, f"discard-{tokens}-{r}", "discard", kv_endpoint, "", kv.pids)
        )
        central_pids = [*kv.pids, broker_pid]
        samples["central"].append(kv_run(kv, tokens, f"c-{tokens}-{r}", "copy", broker, broker, central_pids))
        samples["same-host"].append(
            kv_run(kv, tokens, f"s-{tokens}-{r}", "copy", kv_endpoint, "", kv.pids, shared=True)
        )
        for m, sec in secured.items():
            tid = f"{sec.scope}{m}-{tokens}-{r}"
            samples[m].append(kv_run(sec.pair, tokens, tid, "copy", sec.endpoint, "", sec.pair.pids))
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=5, help="rounds per size; the best run is reported")
    parser.add_argument("--chunk-mb", type=int, default=1, help="KV chunk size (and raw pyzmq frame size)")
    parser.add_argument("--window-mb", type=int, default=32, help="receiver credit window per transfer")
    parser.add_argument("--ring-slots", type=int, default=4, help="slots of a same-host ring (at least 3)")
    parser.add_argument("--ring-slot-mb", type=int, default=4, help="size of a same-host ring's slot")
    args = parser.parse_args(argv)

    proc, conn = spawn(raw_receiver_process)
    raw = Pair((proc, conn), spawn(raw_sender_process, conn.recv(), args.chunk_mb))
    assert raw.tx.recv() == "up"
    proc, conn = spawn(receiver_process, args.window_mb, args.ring_slots, args.ring_slot_mb, None)
    kv_endpoint = conn.recv()
    kv = Pair((proc, conn), spawn(sender_process, args.chunk_mb, None, ""))
    assert kv.tx.recv() == "up"
    broker_proc, broker = start_broker(args.window_mb)
    keys_dir = tempfile.TemporaryDirectory(prefix="pdorch-bench-keys-")
    keys = KeySet.create(Path(keys_dir.name) / "keys", {SENDER: (), RECEIVER: ()})
    secured = {
        "p2p+auth": secured_pair(keys, KvPayload.PLAINTEXT, args),
        "p2p+curve": secured_pair(keys, KvPayload.ENCRYPTED, args),
    }

    print("KV handoff of a Llama-3-8B-shaped request (32 layers x [T, 2, 8, 128] fp16, 128 KiB/token);")
    print(f"chunks of {args.chunk_mb} MiB, window {args.window_mb} MiB, best of {args.repeats} rounds;")
    print(f"same-host rings of {args.ring_slots} x {args.ring_slot_mb} MiB.")
    print("GB/s (x = ratio to raw pyzmq, m = ratio to memcpy); CPU seconds per GiB summed over the")
    print("processes involved (median).")
    head = ["tokens", "MiB", "memcpy", "raw zmq", "raw+work", "p2p", "p2p-discard", "central", "same-host"]
    head += ["p2p+auth", "p2p+curve", "cpu:raw", "r+work", "p2p", "discard", "central", "same-host"]
    head += ["+auth", "+curve"]
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, WIDTHS, strict=True)))
    try:
        for tokens in args.tokens:
            samples = measure_size(
                tokens, args.repeats, raw, kv, kv_endpoint, broker, broker_proc.pid, secured
            )
            gib = tokens * TOKEN_BYTES / 2**30
            rate = {m: tokens * TOKEN_BYTES / min(s.seconds for s in samples[m]) / 1e9 for m in METHODS}
            cpu = {m: statistics.median(s.cpu_seconds for s in samples[m]) / gib for m in METHODS}
            cells = [
                str(tokens),
                str(tokens * TOKEN_BYTES // MIB),
                f"{rate['memcpy']:.2f}",
                f"{rate['raw']:.2f}",
            ]
            cells += [
                f"{rate[m]:.2f} ({rate[m] / rate['raw']:.2f}x)"
                for m in ("raw+work", "p2p", "p2p-discard", "central")
            ]
            shared = rate["same-host"]
            cells.append(f"{shared:.2f} ({shared / rate['memcpy']:.2f}m {shared / rate['raw']:.2f}x)")
            cells += [f"{rate[m]:.2f} ({rate[m] / rate['raw']:.2f}x)" for m in ("p2p+auth", "p2p+curve")]
            cells += [
                f"{cpu[m]:.2f}"
                for m in (
                    "raw",
                    "raw+work",
                    "p2p",
                    "p2p-discard",
                    "central",
                    "same-host",
                    "p2p+auth",
                    "p2p+curve",
                )
            ]
            print(" ".join(f"{c:>{w}}" for c, w in zip(cells, WIDTHS, strict=True)), flush=True)
    finally:
        raw.stop()
        kv.stop()
        for sec in secured.values():
            sec.pair.stop()
        keys_dir.cleanup()
        broker_proc.terminate()
        broker_proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
