"""The request hot path: pdorch's scheduler against Rust P/D routers, on zero-compute backends.

Every system serves the same closed-loop load, in the same run, interleaved round by round:

- **direct**: the client talks to one zero-compute vLLM stand-in (``bench/zero_vllm.py``): the floor.
- **vllm-router** (``--vllm-pd-disaggregation``) and **sglang-router** (``--pd-disaggregation``): the
  Rust routers from PyPI, in front of a zero-compute prefill and a zero-compute decode server.
  They are installed into a virtualenv of the bench's own (``bench/out/peers``), never into the
  project's.
- **pdorch**: ``pdorch scheduler`` with one prefill and one decode agent whose engine costs nothing
  (``--engine sim --sim-time-scale 0``: the protocol, the KV plane with a stand-in KV, no modeled
  time), p2p. So its figures are the orchestration alone.

For each scenario (streaming or not; 16 or 256 output tokens) it measures the p50 latency with one
client and the throughput and p99 with ``--clients`` (32), and the CPU seconds each process spent
per 1000 requests (from /proc). Prints one table per scenario and the ratios to the routers.

Run: ``.venv/bin/python bench/overhead.py`` (``--help``; ``make bench`` runs it too; ~10 minutes,
plus the peers' installation the first time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.bench_venv import bench_venv
from pdorch.launcher import free_port
from transport.security.key_set import SCHEDULER, KeySet

REPO_ROOT = Path(__file__).resolve().parents[1]
WORK = REPO_ROOT / "bench" / "out" / "overhead"
PEERS = {"vllm-router": "0.1.17", "sglang-router": "0.3.2"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------ processes


def peers_python() -> Path:
    """The bench's own virtualenv with the peer routers (made once)."""
    return bench_venv(WORK / "peers", PEERS)


@dataclass
class System:
    name: str
    url: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds so far per role (the agents of one role summed: "prefill-3" is "prefill")."""
        out: dict[str, float] = {}
        for name, proc in self.procs.items():
            role = name.split("-")[0]
            try:
                with open(f"/proc/{proc.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                used = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
            except OSError:
                used = float("nan")
            out[role] = out.get(role, 0.0) + used
        return out

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env={**os.environ, **(env or {})}
        )


def zero_server(log_dir: Path, name: str) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    proc = spawn(
        [sys.executable, str(REPO_ROOT / "bench" / "zero_vllm.py"), str(port)], log_dir / f"{name}.log"
    )
    return f"http://127.0.0.1:{port}", proc


def start_systems(log_dir: Path, only: list[str], time_scale: float = 0.0, nodes: int = 1) -> list[System]:
    """``nodes``: pdorch's prefill agents, and as many decode agents (the peers have one of each)."""
    systems = []
    if "direct" in only:
        url, proc = zero_server(log_dir, "direct")
        systems.append(System("direct", url, {"backend": proc}))
    python = peers_python() if {"vllm-router", "sglang-router"} & set(only) else Path("python")
    for name, command in (
        (
            "vllm-router",
            [str(python.with_name("vllm-router")), "--vllm-pd-disaggregation", "--log-level", "warning"],
        ),
        (
            "sglang-router",
            [str(python), "-m", "sglang_router.launch_router", "--pd-disaggregation", "--log-level", "warn"],
        ),
    ):
        if name not in only:
            continue
        p_url, p_proc = zero_server(log_dir, f"{name}-prefill")
        d_url, d_proc = zero_server(log_dir, f"{name}-decode")
        port = free_port()
        argv = [*command, "--host", "127.0.0.1", "--port", str(port), "--prefill", p_url, "--decode", d_url]
        argv += ["--prometheus-port", str(free_port())]
        router = spawn(argv, log_dir / f"{name}.log")
        procs = {"router": router, "prefill": p_proc, "decode": d_proc}
        systems.append(System(name, f"http://127.0.0.1:{port}", procs))
    if "pdorch" in only:
        port, control = free_port(), free_port()
        # Authenticated as a deployment is: a throwaway key per process.
        workers = [f"{role}-{i}" for role in ("prefill", "decode") for i in range(nodes)]
        keys = KeySet.create(log_dir / "pdorch-keys", dict.fromkeys(workers, ()))
        scheduler = spawn(
            [sys.executable, "-m", "pdorch", "scheduler", "--port", str(port), "--control-bind",
             f"tcp://127.0.0.1:{control}", "--log-level", "WARNING"],
            log_dir / "pdorch-scheduler.log",
            keys.env(SCHEDULER),
        )  # fmt: skip
        agents = {}
        for worker in workers:
            agents[worker] = spawn(
                [sys.executable, "-m", "pdorch", "worker", "--scheduler", f"tcp://127.0.0.1:{control}",
                 "--role", worker.split("-")[0], "--worker-id", worker, "--engine", "sim",
                 "--sim-time-scale", str(time_scale), "--model", "zero", "--log-level", "WARNING"],
                log_dir / f"pdorch-{worker}.log",
                {"OPENBLAS_NUM_THREADS": "1", **keys.env(worker)},
            )  # fmt: skip
        systems.append(System("pdorch", f"http://127.0.0.1:{port}", {"scheduler": scheduler, **agents}))
    return systems


async def wait_ready(system: System, timeout_s: float = 120) -> None:
    """Until it answers, and (pdorch) every agent started has registered."""
    deadline = time.monotonic() + timeout_s
    agents = sum(1 for name in system.procs if name.startswith(("prefill-", "decode-")))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        while time.monotonic() < deadline:
            try:
                if (await one(s, system.url, stream=False, max_tokens=2)) == 2:
                    if not agents:
                        return
                    async with s.get(system.url + "/v1/cluster") as r:
                        if len((await r.json())["workers"]) >= agents:
                            return
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                pass
            await asyncio.sleep(0.3)
    raise RuntimeError(f"{system.name} did not get ready")


# ------------------------------------------------------------------------------ load


SHORT_PROMPT = "Hello from the overhead bench"


def long_prompt(chars: int) -> str:
    """A prompt of ``chars`` characters (as many tokens for pdorch's zero-cost model, whose
    tokenizer is byte-level): real prompts are thousands of tokens, and what a prompt costs each
    hop grows with it."""
    text = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. "
    return (text * (chars // len(text) + 1))[:chars]


async def one(
    session: aiohttp.ClientSession, url: str, *, stream: bool, max_tokens: int, prompt: str = SHORT_PROMPT
) -> int:
    """One completion; returns how many tokens came back."""
    body = {"model": "zero", "prompt": prompt, "max_tokens": max_tokens}
    body |= {"stream": stream, "ignore_eos": True, "return_token_ids": True, "temperature": 0}
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise ValueError(f"HTTP {r.status}: {await r.text()}")
        if not stream:
            return len((await r.json())["choices"][0]["token_ids"])
        tokens = 0
        async for line in r.content:
            if line.startswith(b"data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    tokens += len(choice.get("token_ids") or ())
        return tokens


@dataclass
class Result:
    latencies: list[float]
    seconds: float
    cpu: dict[str, float]

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    def quantile(self, q: float) -> float:
        lat = sorted(self.latencies)
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")


async def load(
    system: System, clients: int, seconds: float, stream: bool, max_tokens: int, prompt: str = SHORT_PROMPT
) -> Result:
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as s:
        for _ in range(min(clients, 8)):  # warm the connections
            await one(s, system.url, stream=stream, max_tokens=max_tokens, prompt=prompt)
        cpu0 = system.cpu_s()
        begin = time.perf_counter()
        end = begin + seconds

        async def client() -> None:
            while (start := time.perf_counter()) < end:
                got = await one(s, system.url, stream=stream, max_tokens=max_tokens, prompt=prompt)
                assert got == max_tokens, f"{system.name}: {got} tokens, asked for {max_tokens}"
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - begin
        cpu1 = system.cpu_s()
    return Result(latencies, elapsed, {k: cpu1[k] - cpu0[k] for k in cpu0})


# ------------------------------------------------------------------------------ the run


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--systems", nargs="+", default=["direct", "vllm-router", "sglang-router", "pdorch"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 256])
    parser.add_argument(
        "--pdorch-time-scale",
        type=float,
        default=0.0,
        help="pdorch's sim engines: 0 hands every token over in one message; a small value "
        "(1e-4) runs decode steps, one message per step, as a real engine does",
    )
    parser.add_argument(
        "--prompt-chars",
        type=int,
        default=0,
        help="a prompt of this many characters (~tokens) instead of a short sentence",
    )
    parser.add_argument(
        "--pdorch-nodes",
        type=int,
        default=1,
        help="pdorch's prefill agents, and as many decode agents (its CPU per request by role sums them)",
    )
    args = parser.parse_args()
    prompt = long_prompt(args.prompt_chars) if args.prompt_chars else SHORT_PROMPT
    log_dir = WORK / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    systems = start_systems(log_dir, args.systems, args.pdorch_time_scale, args.pdorch_nodes)
    scenarios = [(stream, n) for n in args.tokens for stream in (True, False)]
    best: dict[tuple[str, bool, int, int], Result] = {}
    try:
        await asyncio.gather(*(wait_ready(s) for s in systems))
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", flush=True)
            for stream, n in scenarios:
                for clients in (1, args.clients):
                    for system in systems:
                        res = await load(system, clients, args.seconds, stream, n, prompt)
                        key = (system.name, stream, n, clients)
                        # Best of the rounds: on a shared machine, load elsewhere only slows runs.
                        if key not in best or res.rate > best[key].rate:
                            best[key] = res
    finally:
        for system in systems:
            system.stop()
    report(systems, scenarios, best, args.clients)
    print(f"prompt: {len(prompt)} characters")


def report(
    systems: list[System],
    scenarios: list[tuple[bool, int]],
    best: dict[tuple[str, bool, int, int], Result],
    clients: int,
) -> None:
    for stream, n in scenarios:
        print(f"\n{'streaming' if stream else 'non-streaming'}, {n} output tokens")
        print(
            f"| system | p50 @1 (ms) | added p50 vs direct (ms) | req/s @{clients} | p99 @{clients} (ms) "
            "| CPU ms per request, by process |"
        )
        print("|---|---|---|---|---|---|")
        direct = best.get(("direct", stream, n, 1))
        for system in systems:
            one_c, many = best[(system.name, stream, n, 1)], best[(system.name, stream, n, clients)]
            added = (one_c.quantile(0.5) - direct.quantile(0.5)) * 1e3 if direct else float("nan")
            per_req = ", ".join(
                f"{role} {cpu * 1e3 / max(1, len(many.latencies)):.2f}" for role, cpu in many.cpu.items()
            )
            print(
                f"| {system.name} | {one_c.quantile(0.5) * 1e3:.2f} | {added:.2f} | {many.rate:.0f} "
                f"| {many.quantile(0.99) * 1e3:.1f} | {per_req} |"
            )
        ours = best.get(("pdorch", stream, n, clients))
        for peer in ("vllm-router", "sglang-router"):
            theirs = best.get((peer, stream, n, clients))
            if ours and theirs:
                print(f"pdorch / {peer} req/s: {ours.rate / theirs.rate:.2f}x")
    per_token(systems, scenarios, best, clients)
    print(f"\npeers: {', '.join(f'{k} {v}' for k, v in PEERS.items())}; each cell the best of the rounds")


def per_token(
    systems: list[System],
    scenarios: list[tuple[bool, int]],
    best: dict[tuple[str, bool, int, int], Result],
    clients: int,
) -> None:
    """CPU per streamed output token, per process: the CPU per request at the longest output less
    that at the shortest, over the tokens between (what a token costs beyond the request)."""
    lengths = sorted({n for _, n in scenarios})
    if len(lengths) < 2:
        return
    short, long_ = lengths[0], lengths[-1]
    print(f"\nCPU us per output token, streaming ({long_} vs {short} tokens, {clients} clients)")
    print("| system | CPU us per token, by process |")
    print("|---|---|")
    for system in systems:
        a, b = best.get((system.name, True, short, clients)), best.get((system.name, True, long_, clients))
        if a is None or b is None:
            continue
        cells = []
        for role in b.cpu:
            per_a = a.cpu[role] / max(1, len(a.latencies))
            per_b = b.cpu[role] / max(1, len(b.latencies))
            cells.append(f"{role} {(per_b - per_a) * 1e6 / (long_ - short):.1f}")
        print(f"| {system.name} | {', '.join(cells)} |")


if __name__ == "__main__":
    asyncio.run(main())
