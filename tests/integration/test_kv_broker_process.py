"""The KV broker as a real OS process: started with ``python -m`` with its keys, used by an
authenticated worker, stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest
import zmq.asyncio

from transport.kv import ArraySink, KvReceiver, KvSender
from transport.messages import KvMode, KvRoute
from transport.security import KeyKind, Security, SecurityConfig
from transport.security.key_set import KV_BROKER, KeySet

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
async def test_broker_process_serves_a_handoff_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    keys = KeySet.create(tmp_path, {"worker-a": ()})
    log = tmp_path / "broker.log"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **keys.env(KV_BROKER)}
    worker = Security.load(
        SecurityConfig(key_file=str(keys.key_file("worker-a")), trusted_keys=str(keys.trusted_dir))
    )
    route = KvRoute(KvMode.CENTRALIZED, "", "worker-a/proc", worker.server_key(KeyKind.KV_BROKER))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "transport.kv.broker_cli",
        "--bind",
        "tcp://127.0.0.1:0",
        "--capacity-mb",
        "64",
        "--ttl-s",
        "30",
        "--stats-interval-s",
        "0.2",
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=log.open("wb"),
    )
    ctx = zmq.asyncio.Context()
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("kv-broker listening on tcp://127.0.0.1:"), line
        endpoint = line.rsplit(" ", 1)[1].strip()
        route = msgspec.structs.replace(route, endpoint=endpoint)

        layers = np.random.default_rng(5).standard_normal((4, 256, 2, 8, 128)).astype(np.float16)
        sender = KvSender(ctx, security=worker)
        fetcher = KvReceiver(ctx, security=worker, bind=None)
        await fetcher.start()
        stream = await sender.open(
            route,
            num_layers=4,
            rows_per_layer=256,
            row_shape=(2, 8, 128),
            dtype="float16",
            deadline_s=30,
        )
        for layer in range(4):
            await stream.send_layer(layer, layers[layer])
        await stream.finish({"first_token": 3})
        sink = ArraySink(4, 256, (2, 8, 128), "float16")
        assert await fetcher.receive(route, sink, deadline_s=30) == {"first_token": 3}
        assert np.array_equal(sink.layers, layers)
        await sender.close()
        await fetcher.close()
        # Its counters, logged every --stats-interval-s: both connections got through their handshake.
        wanted = "accepted=1, rejected=0, evicted=0, delivered=1"
        for _ in range(100):
            stats = [line for line in log.read_text().splitlines() if " stats " in line]
            if stats and wanted in stats[-1] and "admitted_handshakes=2, refused_handshakes=0" in stats[-1]:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"no stats line with {wanted} and two admitted handshakes: {stats[-1:]}")

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        worker.close()
        ctx.destroy(linger=0)
