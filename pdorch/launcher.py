"""``pdorch up``: a whole pdorch cluster as separate OS processes on 127.0.0.1.

It only spawns processes (``python -m pdorch ...``); it imports neither the scheduler's nor the
workers' internals. The end-to-end tests use :class:`LocalCluster` too, so what they test is what
``make run`` starts.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass
class ClusterSpec:
    prefill: int = 1
    decode: int = 1
    kv_mode: str = "p2p"
    colocated: bool = False
    port: int = 8000  # 0: pick free ports for everything
    control_port: int = 5555
    broker_port: int = 5700
    python: str = sys.executable
    log_dir: Path | None = None
    worker_args: list[str] = field(default_factory=list)
    # Extra arguments for one worker by name (e.g. "decode-0").
    per_worker_args: dict[str, list[str]] = field(default_factory=dict)
    scheduler_args: list[str] = field(default_factory=list)
    log_level: str = "INFO"


class LocalCluster:
    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        if spec.port == 0:
            spec.port, spec.control_port, spec.broker_port = free_port(), free_port(), free_port()
        self.log_dir = spec.log_dir or Path(tempfile.mkdtemp(prefix="pdorch-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._args: dict[str, list[str]] = {}
        self.url = f"http://127.0.0.1:{spec.port}"
        self.control = f"tcp://127.0.0.1:{spec.control_port}"
        self.broker = f"tcp://127.0.0.1:{spec.broker_port}"

    # ------------------------------------------------------------------ processes

    def _spawn(self, name: str, args: list[str]) -> None:
        self._args[name] = args
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child's lifetime
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.procs[name] = subprocess.Popen(
            [self.spec.python, "-m", "pdorch", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C in a terminal goes to us; we stop the children in order
        )

    def worker_names(self) -> list[str]:
        return [n for n in self.procs if n.startswith(("prefill-", "decode-", "worker-"))]

    def start_worker(self, name: str, role: str) -> None:
        self._spawn(
            name,
            [
                "worker",
                "--scheduler",
                self.control,
                "--role",
                role,
                "--worker-id",
                name,
                "--log-level",
                self.spec.log_level,
                *self.spec.worker_args,
                *self.spec.per_worker_args.get(name, []),
            ],
        )

    def start(self, timeout_s: float = 60.0) -> None:
        s = self.spec
        for port in (s.port, s.control_port) + ((s.broker_port,) if s.kv_mode == "centralized" else ()):
            if not port_is_free(port):
                raise RuntimeError(
                    f"port {port} on 127.0.0.1 is in use; choose others (--port/--control-port)"
                )
        sched = [
            "scheduler",
            "--port",
            str(s.port),
            "--control-bind",
            self.control,
            "--kv-mode",
            s.kv_mode,
            "--log-level",
            s.log_level,
            *s.scheduler_args,
        ]
        if s.kv_mode == "centralized" and not s.colocated:
            self._spawn("kv-broker", ["kv-broker", "--bind", self.broker])
            sched += ["--kv-broker", self.broker]
        if s.colocated:
            sched.append("--colocated")
        self._spawn("scheduler", sched)
        if s.colocated:
            for i in range(max(1, s.prefill)):
                self.start_worker(f"worker-{i}", "both")
        else:
            for i in range(s.prefill):
                self.start_worker(f"prefill-{i}", "prefill")
            for i in range(s.decode):
                self.start_worker(f"decode-{i}", "decode")
        self.wait_ready(len(self.worker_names()), timeout_s)

    def wait_ready(self, workers: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")
            try:
                if len(self.cluster_state()["workers"]) >= workers:
                    return
            except (OSError, urllib.error.URLError, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"cluster not ready within {timeout_s:.0f}s; logs in {self.log_dir}")

    def cluster_state(self) -> dict:
        with urllib.request.urlopen(self.url + "/v1/cluster", timeout=2) as r:
            return json.load(r)

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def restart(self, name: str) -> None:
        """Start a stopped process again with the arguments it had."""
        self._spawn(name, self._args[name])

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(10)

    def stop(self, timeout_s: float = 10.0) -> None:
        # Workers first (they drain), then the scheduler and broker.
        order = [*self.worker_names(), *(n for n in self.procs if n not in self.worker_names())]
        for name in order:
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for name in order:
            proc = self.procs[name]
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill", type=int, default=1, help="prefill workers (default 1)")
    p.add_argument("--decode", type=int, default=1, help="decode workers (default 1)")
    p.add_argument(
        "--kv-mode", choices=["p2p", "centralized"], default="p2p", help="KV handoff mode (default p2p)"
    )
    p.add_argument(
        "--colocated",
        action="store_true",
        help="one worker with role 'both' serves each request whole (no KV handoff), for comparison",
    )
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--control-port", type=int, default=5555, help="ZeroMQ control port (default 5555)")
    p.add_argument(
        "--broker-port", type=int, default=5700, help="KV broker port, centralized mode (default 5700)"
    )
    p.add_argument(
        "--log-dir", type=Path, default=None, help="where process logs go (default: a new temp dir)"
    )
    p.add_argument("--log-level", default="INFO")


def _example(url: str) -> str:
    body = json.dumps({"model": "pdorch-reference", "prompt": "Hello, pdorch", "max_tokens": 16})
    return f"curl -s {url}/v1/completions -H 'Content-Type: application/json' -d '{body}'"


def main(args: argparse.Namespace) -> int:
    spec = ClusterSpec(
        prefill=args.prefill,
        decode=args.decode,
        kv_mode=args.kv_mode,
        colocated=args.colocated,
        port=args.port,
        control_port=args.control_port,
        broker_port=args.broker_port,
        log_dir=args.log_dir,
        log_level=args.log_level,
    )
    cluster = LocalCluster(spec)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        print(
            f"starting pdorch ({'colocated' if spec.colocated else spec.kv_mode}); logs in {cluster.log_dir}",
            flush=True,
        )
        cluster.start()
        mode = (
            "colocated"
            if spec.colocated
            else f"{spec.prefill} prefill + {spec.decode} decode, {spec.kv_mode}"
        )
        print(
            f"\npdorch is ready ({mode}): {cluster.url}\n\nTry:\n  {_example(cluster.url)}\n\n"
            f"Cluster state: {cluster.url}/v1/cluster   Ctrl-C stops everything.",
            flush=True,
        )
        while True:
            for name, proc in cluster.procs.items():
                if proc.poll() is not None:
                    print(
                        f"{name} exited with {proc.returncode}; stopping. Last lines:\n{cluster.tail(name)}",
                        file=sys.stderr,
                    )
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
        return 0
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
