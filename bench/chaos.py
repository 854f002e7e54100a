"""Chaos: a closed-loop load against `pdorch up --prefill 2 --decode 2` while workers are killed.

Every 10-15 s (``--kill-every``) a random worker process is killed with SIGKILL; `pdorch up`
restarts it, the scheduler moves its requests to the others. In centralized mode the KV broker is
killed once too, halfway through. Clients (``--clients``, closed loop) send a mix of prompts of 1
to several hundred tokens, max_tokens 8 to 96, greedy and seeded, streaming and not, some with two
choices (`n`) and some a batch of two prompts, drawn from a fixed pool whose outputs were first
computed on a colocated cluster: every answer is checked against those, choice by choice and token
for token.

Prints, per KV mode: sent / ok / failed / hung / corrupted, the kills, the scheduler's migrations
by phase, and the time a migration cost its request (the scheduler's ``pdorch_migration_seconds``:
from the last progress before the failure to the next attempt's first). Target: 0 failed, 0 hung,
0 corrupted.

Run: ``.venv/bin/python bench/chaos.py`` (``--help``; ``make chaos`` runs it; ~8 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench import prom
from pdorch.launcher import ClusterSpec, LocalCluster, free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = "pdorch-reference"


# ----------------------------------------------------------------------------------- workload


def make_pool(size: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)

    def prompt() -> list[int]:
        length = rng.choice([rng.randint(1, 16), rng.randint(16, 128), rng.randint(128, 600)])
        return [rng.randrange(256) for _ in range(length)]

    pool = []
    for i in range(size):
        body: dict[str, Any] = {
            "model": MODEL,
            "prompt": prompt(),
            "max_tokens": rng.randint(8, 96),
            "return_token_ids": True,
            "stream": rng.random() < 0.5,
        }
        body.update(
            {"temperature": 0.9, "top_p": 0.95, "seed": i} if rng.random() < 0.5 else {"temperature": 0.0}
        )
        shape = rng.random()
        if shape < 0.15:
            body["n"] = 2  # the second choice starts next to the first's KV, and moves on its own
        elif shape < 0.3:
            body["prompt"] = [body["prompt"], prompt()]  # a batch: each prompt a request of its own
        pool.append(body)
    return pool


# Each choice's token ids, in choice order.
Answer = list[list[int]]


async def send(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[str, Answer]:
    """("ok", each choice's tokens) or ("failed", []) for an HTTP or in-stream error."""
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            await r.read()
            return "failed", []
        ids: dict[int, list[int]] = {}
        if not body["stream"]:
            for choice in (await r.json())["choices"]:
                ids[choice["index"]] = choice["token_ids"]
            return "ok", [ids[i] for i in sorted(ids)]
        async for raw in r.content:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                return "ok", [ids[i] for i in sorted(ids)]
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    return "failed", []
                for choice in event.get("choices", []):
                    ids.setdefault(choice["index"], []).extend(choice.get("token_ids") or [])
        return "failed", []  # the stream ended without [DONE]


async def expected_outputs(pool: list[dict[str, Any]], log_dir: Path) -> list[Answer]:
    with LocalCluster(
        ClusterSpec(colocated=True, port=0, log_dir=log_dir / "colocated", log_level="WARNING", model=MODEL)
    ) as c:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
            sem = asyncio.Semaphore(8)

            async def one(body: dict[str, Any]) -> Answer:
                async with sem:
                    outcome, ids = await send(s, c.url, body)
                    assert outcome == "ok", "the colocated reference failed a request"
                    return ids

            return await asyncio.gather(*(one(b) for b in pool))


# ----------------------------------------------------------------------------------- the cluster


def children(pid: int) -> dict[str, int]:
    """`pdorch up`'s children by role name (from their command lines)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid != pid:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if "--worker-id" in args:
            found[args[args.index("--worker-id") + 1]] = int(entry)
        elif "kv-broker" in args:
            found["kv-broker"] = int(entry)
        elif "scheduler" in args:
            found["scheduler"] = int(entry)
    return found


class Up:
    """`pdorch up` as its user runs it, on free ports."""

    def __init__(self, mode: str, log_dir: Path) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "pdorch", "up", "--prefill", "2", "--decode", "2", "--kv-mode", mode]
        argv += ["--model", MODEL]
        argv += [
            "--port",
            str(self.port),
            "--control-port",
            str(free_port()),
            "--broker-port",
            str(free_port()),
        ]
        argv += ["--log-dir", str(log_dir), "--log-level", "WARNING"]
        self.out = open(log_dir / "pdorch-up.out", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=self.out, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    async def ready(self, workers: int = 4, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                try:
                    async with s.get(self.url + "/v1/cluster") as r:
                        if len((await r.json())["workers"]) >= workers:
                            return
                except (aiohttp.ClientError, ValueError):
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError("pdorch up did not get ready")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.out.close()


async def metrics_text(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        return await r.text()


# ----------------------------------------------------------------------------------- one run


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    hung: int = 0
    corrupted: int = 0
    kills: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


async def run_mode(
    mode: str, pool: list[dict[str, Any]], want: list[Answer], args: argparse.Namespace, log_dir: Path
) -> tuple[Tally, str]:
    log_dir.mkdir(parents=True, exist_ok=True)
    up = Up(mode, log_dir)
    tally = Tally()
    rng = random.Random(args.seed)
    try:
        await up.ready()
        stop_at = time.monotonic() + args.duration

        async def client(i: int) -> None:
            crng = random.Random(args.seed * 1000 + i)
            timeout = aiohttp.ClientTimeout(total=args.hang_after)
            async with aiohttp.ClientSession(timeout=timeout) as s:
                while time.monotonic() < stop_at:
                    k = crng.randrange(len(pool))
                    tally.sent += 1
                    began = time.monotonic()
                    try:
                        outcome, ids = await send(s, up.url, pool[k])
                    except TimeoutError:
                        tally.hung += 1
                        continue
                    except aiohttp.ClientError:
                        outcome, ids = "failed", []
                    if outcome == "failed":
                        tally.failed += 1
                    elif ids != want[k]:
                        tally.corrupted += 1
                    else:
                        tally.ok += 1
                        tally.latencies.append(time.monotonic() - began)

        async def chaos() -> None:
            broker_killed = mode != "centralized"
            while True:
                await asyncio.sleep(rng.uniform(*args.kill_every))
                if time.monotonic() > stop_at - 5:
                    return
                procs = children(up.proc.pid)
                if not broker_killed and time.monotonic() > stop_at - args.duration / 2:
                    victim, broker_killed = "kv-broker", True
                else:
                    victim = rng.choice(sorted(n for n in procs if n.startswith(("prefill-", "decode-"))))
                if victim in procs:
                    os.kill(procs[victim], signal.SIGKILL)
                    tally.kills.append(victim)
                    print(
                        f"  [{mode}] t={time.monotonic() - stop_at + args.duration:5.1f}s killed {victim}",
                        flush=True,
                    )

        killer = asyncio.create_task(chaos())
        await asyncio.gather(*(client(i) for i in range(args.clients)))
        killer.cancel()
        return tally, await metrics_text(up.url)
    finally:
        up.stop()


def report(mode: str, tally: Tally, metrics: str) -> list[str]:
    scraped = prom.parse(metrics)
    by_phase: dict[str, float] = {}
    for series, count in scraped.items():
        if not series.startswith("pdorch_migrations_total{"):
            continue
        phase = re.search(r'phase="([^"]+)"', series)
        recovery = re.search(r'recovery="([^"]+)"', series)
        if phase and recovery and count:
            key = f"{phase.group(1)}/{recovery.group(1)}"
            by_phase[key] = by_phase.get(key, 0) + count
    migration = prom.histogram(scraped, "pdorch_migration_seconds")
    lat = sorted(tally.latencies)
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
    return [
        f"| {mode} | {tally.sent} | {tally.ok} | {tally.failed} | {tally.hung} | {tally.corrupted} "
        f"| {len(tally.kills)} ({', '.join(sorted(set(tally.kills)))}) "
        f"| {int(sum(by_phase.values()))}: {', '.join(f'{k} {int(v)}' for k, v in sorted(by_phase.items()))} "
        f"| {migration.quantile(0.5):.2f} / {migration.quantile(0.99):.2f} "
        f"| {statistics.median(lat) if lat else float('nan'):.2f} / {p(0.99):.2f} |"
    ]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=180, help="seconds of load per KV mode")
    parser.add_argument("--clients", type=int, default=8, help="concurrent closed-loop clients")
    parser.add_argument("--kill-every", type=float, nargs=2, default=(10.0, 15.0), metavar=("MIN", "MAX"))
    parser.add_argument("--modes", nargs="+", default=["p2p", "centralized"], choices=["p2p", "centralized"])
    parser.add_argument("--pool", type=int, default=300, help="distinct requests the clients draw from")
    parser.add_argument("--hang-after", type=float, default=120, help="a request taking longer is hung")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="pdorch-chaos-"))
    pool = make_pool(args.pool, args.seed)
    print(
        f"computing the {len(pool)} reference outputs on a colocated cluster; logs in {log_dir}", flush=True
    )
    want = await expected_outputs(pool, log_dir)
    rows = [
        "| mode | sent | ok | failed | hung | corrupted | kills | migrations (phase/recovery) "
        "| time lost per migration p50 / p99 (s) | request latency p50 / p99 (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in args.modes:
        print(
            f"{mode}: {args.duration:g}s of load, {args.clients} clients, "
            f"a kill every {args.kill_every[0]:g}-{args.kill_every[1]:g}s",
            flush=True,
        )
        tally, metrics = await run_mode(mode, pool, want, args, log_dir / mode)
        rows += report(mode, tally, metrics)
    print("\n".join(rows))


if __name__ == "__main__":
    asyncio.run(main())
