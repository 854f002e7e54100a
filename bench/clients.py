"""Real load generators against `pdorch up`: their figures next to pdorch's own for the same run.

Starts ``pdorch up`` as a user does (the default model, reference engine, 1 prefill + 1 decode
worker, p2p), on free ports. Then, for each concurrency, runs ``vllm bench serve`` and guidellm
against it one after the other, with the same workload shape (random/synthetic prompts of
``--input-tokens`` tokens, ``--output-tokens`` tokens per answer, streamed completions). Around
each run it scrapes pdorch's ``/metrics`` (and polls it while the run lasts, to find when pdorch
was busy), so pdorch's TTFT, TPOT, req/s and token counts cover exactly that run's requests.

Prints one table: per run, the client's figures and pdorch's, and whether the token totals agree.
pdorch's means are exact (histogram sums); of its quantiles only the bucket is known, so the
table shows the bucket. Every process started here is stopped (by PID) on exit, Ctrl-C and failures included.

Run: ``.venv/bin/python bench/clients.py`` (``--help``; ``make bench-clients``; 15-25 minutes on two
busy cores, plus guidellm's installation into ``bench/out/clients/venv`` the first time).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import signal
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench import prom
from bench.bench_venv import bench_venv
from bench.load_clients import GUIDELLM, Client, Figures, GuideLLM, VllmBenchServe, Workload
from bench.procs import cpu_seconds, spawn, stop
from pdorch.launcher import default_vllm_python, free_port
from workers.models.catalog import DEFAULT_MODEL
from workers.models.local_model import model_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
WORK = REPO_ROOT / "bench" / "out" / "clients"
POLL_S = 0.25
# Counters that move when a request arrives (prompt tokens), progresses and finishes.
ACTIVITY = ("pdorch_prompt_tokens_total", "pdorch_generated_tokens_total", "pdorch_requests_total")


class PdorchUp:
    """`pdorch up` with the default model, as its user starts it, on free ports."""

    def __init__(self, log_dir: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        argv = [sys.executable, "-m", "pdorch", "up", "--port", self.url.rsplit(":", 1)[1]]
        argv += ["--control-port", str(free_port()), "--log-dir", str(log_dir), "--log-level", "WARNING"]
        self.proc = spawn(argv, log_dir / "pdorch-up.out", REPO_ROOT)

    def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pdorch up exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=2) as r:
                    if json.load(r)["ready"]:
                        return
            except (OSError, urllib.error.URLError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError("pdorch up did not get ready")

    def complete(self, model: str, max_tokens: int) -> None:
        """One small request, so the first measured one does not pay for anything done once."""
        body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": max_tokens}).encode()
        req = urllib.request.Request(self.url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            r.read()

    def stop(self) -> None:
        stop(self.proc, signal.SIGINT, grace_s=60)  # its Ctrl-C: workers drain, then the scheduler


@dataclass
class Server:
    """pdorch's own figures for one run (the change of its metrics over it)."""

    requests: float
    ok: float
    ttft: prom.Histogram
    tpot: prom.Histogram
    latency: prom.Histogram
    prompt_tokens: float
    generated_tokens: float
    span_s: float
    migrations: float  # requests moved to another worker mid-way (a worker failed or stalled)


@dataclass
class Cpu:
    """CPU seconds over one client's run: the client's (its processes, all ended by then) and
    pdorch's; on two shared cores, what the client takes is not there for pdorch."""

    client_s: float
    pdorch_s: float
    wall_s: float


def server_figures(
    before: dict[str, float], after: dict[str, float], points: list[tuple[float, float]]
) -> Server:
    def delta(name: str, **labels: str) -> float:
        return prom.total(after, name, **labels) - prom.total(before, name, **labels)

    return Server(
        requests=delta("pdorch_requests_total"),
        ok=delta("pdorch_requests_total", outcome="ok"),
        ttft=prom.histogram_delta(before, after, "pdorch_time_to_first_token_seconds"),
        tpot=prom.histogram_delta(before, after, "pdorch_time_per_output_token_seconds"),
        latency=prom.histogram_delta(before, after, "pdorch_request_latency_seconds"),
        prompt_tokens=delta("pdorch_prompt_tokens_total"),
        generated_tokens=delta("pdorch_generated_tokens_total"),
        span_s=prom.active_span(points),
        migrations=delta("pdorch_migrations_total"),
    )


def activity(samples: dict[str, float]) -> float:
    return sum(prom.total(samples, name) for name in ACTIVITY)


def run_client(
    up: PdorchUp, client: Client, argv: list[str], log: Path, out: Path
) -> tuple[Figures, Server, Cpu]:
    before = prom.scrape(up.url)
    points = [(time.monotonic(), activity(before))]
    # A child's CPU is counted here once it is waited for: the client and what it waited for.
    children0, pdorch0 = resource.getrusage(resource.RUSAGE_CHILDREN), cpu_seconds(up.proc.pid)
    proc = spawn(argv, log, REPO_ROOT)
    try:
        while proc.poll() is None:
            time.sleep(POLL_S)
            # A slow scrape on a busy machine is skipped: the next one will do.
            with contextlib.suppress(OSError, urllib.error.URLError):
                points.append((time.monotonic(), activity(prom.scrape(up.url))))
    finally:
        stop(proc)
    after = prom.scrape(up.url)
    points.append((time.monotonic(), activity(after)))
    scrapes = {"before": before, "after": after, "activity": points}
    out.with_name(out.stem + "-pdorch.json").write_text(json.dumps(scrapes))  # to re-read the run later
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_s = children1.ru_utime + children1.ru_stime - children0.ru_utime - children0.ru_stime
    cpu = Cpu(client_s, cpu_seconds(up.proc.pid) - pdorch0, points[-1][0] - points[0][0])
    if proc.returncode != 0:
        raise RuntimeError(f"{client.name} exited with {proc.returncode}; see {log}")
    return client.read(out), server_figures(before, after, points), cpu


# ------------------------------------------------------------------------------ the report


def ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 1e3:.0f}"


def rows(label: str, fig: Figures, srv: Server) -> list[str]:
    def triple(t: tuple[float, float, float]) -> str:
        return " / ".join(ms(x) for x in t)

    def hist(h: prom.Histogram) -> str:
        # The bucket a quantile is in, not a point within it: the buckets are wide (up to 20 s).
        ranges = [f"{ms(lo)}-{ms(hi)}" for lo, hi in (h.bucket(0.5), h.bucket(0.99))]
        return " / ".join([ms(h.mean), *ranges])

    span = srv.span_s
    return [
        f"| {label} | client | {fig.requests} ok, {fig.failed} failed | {triple(fig.ttft_s)} "
        f"| {triple(fig.tpot_s)} | {fig.req_per_s:.3f} | {fig.output_tok_per_s:.1f} "
        f"| {fig.input_tokens} | {fig.output_tokens} | {fig.duration_s:.1f} |",
        f"| | pdorch | {srv.ok:.0f} ok, {srv.requests - srv.ok:.0f} other | {hist(srv.ttft)} "
        f"| {hist(srv.tpot)} | {srv.ok / span:.3f} | {srv.generated_tokens / span:.1f} "
        f"| {srv.prompt_tokens:.0f} | {srv.generated_tokens:.0f} | {span:.1f} |",
    ]


def agreement(label: str, fig: Figures, srv: Server, w: Workload) -> str:
    """Do the client's counts, pdorch's and the asked-for shape agree? Both clients take their
    token counts from the answers' ``usage`` (pdorch's count), so the shape is the check that
    the client's tokenizer made prompts of the length pdorch counts."""
    diffs = [
        f"{what}: {c}"
        for what, c in (
            ("requests", (fig.requests + fig.failed, srv.requests, w.prompts)),
            ("input tokens", (fig.input_tokens, srv.prompt_tokens, w.prompts * w.input_tokens)),
            ("output tokens", (fig.output_tokens, srv.generated_tokens, w.prompts * w.output_tokens)),
        )
        if len(set(c)) > 1
    ]
    gap = (fig.ttft_s[0] - srv.ttft.mean) * 1e3
    agree = (
        f"differ (client, pdorch, asked for): {'; '.join(diffs)}"
        if diffs
        else "client, pdorch and the asked-for shape agree on requests and token totals"
    )
    moved = f"; pdorch moved {srv.migrations:.0f} requests to another worker" if srv.migrations else ""
    return f"{label}: {agree}; client TTFT mean - pdorch TTFT mean = {gap:.0f} ms{moved}"


HEADER = [
    "| run | source | requests | TTFT mean / p50 / p99 (ms) | TPOT mean / p50 / p99 (ms) | req/s "
    "| output tok/s | input tokens | output tokens | window (s) |",
    "|---|---|---|---|---|---|---|---|---|---|",
]


# ------------------------------------------------------------------------------ the run


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM too: the finally blocks stop what was started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--prompts", type=int, nargs="+", default=[8, 24], help="requests per run, one per --concurrency"
    )
    parser.add_argument("--clients", nargs="+", default=["vllm", "guidellm"], choices=["vllm", "guidellm"])
    args = parser.parse_args()
    if len(args.prompts) != len(args.concurrency):
        parser.error("give one --prompts per --concurrency")
    signal.signal(signal.SIGTERM, _interrupt)
    run_dir = WORK / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True)
    clients: dict[str, Client] = {}
    if "vllm" in args.clients:
        clients["vllm"] = VllmBenchServe(Path(default_vllm_python()))
    if "guidellm" in args.clients:
        clients["guidellm"] = GuideLLM(bench_venv(WORK / "venv", GUIDELLM))
    tokenizer, model = str(model_dir(DEFAULT_MODEL)), DEFAULT_MODEL
    loads = [f"load average at the start: {load_average()}"]
    print(f"pdorch up ({model}); logs and results in {run_dir}; {loads[0]}", flush=True)
    up = PdorchUp(run_dir)
    table, notes = list(HEADER), []
    try:
        up.wait_ready()
        up.complete(model, 4)
        for concurrency, prompts in zip(args.concurrency, args.prompts, strict=True):
            w = Workload(args.input_tokens, args.output_tokens, prompts, concurrency)
            for key, client in clients.items():
                label = f"{client.name}, c={concurrency}"
                out = run_dir / f"{key}-c{concurrency}.json"
                print(
                    f"{label}: {prompts} requests of {w.input_tokens} -> {w.output_tokens} tokens", flush=True
                )
                argv = client.argv(up.url, model, tokenizer, w, out)
                (run_dir / f"{key}-c{concurrency}.cmd").write_text(" ".join(argv) + "\n")
                fig, srv, cpu = run_client(up, client, argv, run_dir / f"{key}-c{concurrency}.log", out)
                table += rows(label, fig, srv)
                notes.append(
                    f"{agreement(label, fig, srv, w)}; CPU over the client's {cpu.wall_s:.0f} s: "
                    f"client {cpu.client_s:.0f} s, pdorch {cpu.pdorch_s:.0f} s "
                    f"({srv.generated_tokens / cpu.pdorch_s:.1f} output tokens per pdorch CPU second)"
                )
                print("\n".join([*table[-2:], notes[-1]]), flush=True)
    finally:
        up.stop()
    loads.append(f"at the end: {load_average()}")
    report = [*table, "", *notes, "", ", ".join(loads) + " (1, 5, 15 minutes)"]
    print("\n" + "\n".join(report))
    (run_dir / "table.md").write_text("\n".join([*report, ""]))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; every process the bench started was stopped")
