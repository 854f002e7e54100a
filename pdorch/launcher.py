"""``pdorch up``: a whole pdorch cluster as separate OS processes on 127.0.0.1.

It only spawns processes (``python -m pdorch ...``) and supervises them (``supervisor.py``: a child
that dies is restarted, the cluster stays whole). It imports none of the scheduler's internals and
of the workers' only ``workers.models`` (which model directory to serve; converted once, before the
workers start) and ``workers.engines.vllm.launch``, which builds a vLLM server's command line (it
imports no vLLM). The end-to-end tests use :class:`LocalCluster` too, so what they test is what
``make run`` starts.

The cluster is authenticated like any other: it makes a throwaway key set in its log directory (a
key per process, each process given its own through the environment), so a restarted child
registers again with the same key, and nothing else on the machine can join.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pdorch.supervisor import Supervisor
from transport.errors import ErrorCode, PdorchError
from transport.kv.receiver import ReceiverLimits
from transport.messages import Role
from transport.security.key_set import KeySet
from transport.security.keys import KeyKind
from workers.models.catalog import CATALOG, DEFAULT_MODEL, RANDOM_MODEL
from workers.models.fetch import is_fetched
from workers.models.local_model import is_model_path, model_dir, not_fetched_message, served_name

if TYPE_CHECKING:
    from workers.engines.vllm.launch import VllmLaunchSpec

# Context given to each vLLM server (at most the model's): room for real chats, while vLLM's KV
# cache (1 GiB by default) holds many such requests at once.
VLLM_MAX_MODEL_LEN = 2048


def model_name(spec: ClusterSpec) -> str:
    """The model name clients use: a catalogued model's name, its file or directory name, or (sim)
    the simulated model's (as ``--model``, else ``--sim-model``, in the workers' arguments)."""
    if spec.engine == "sim":
        return _flag(spec.worker_args, "--model") or _flag(spec.worker_args, "--sim-model") or SIM_MODEL
    return served_name(spec.model)


# The model a simulated cluster times by default (the sim engine's own default).
SIM_MODEL = "llama-3-8b"


def _flag(args: list[str], name: str) -> str:
    """The value of ``name`` in an argument list (``--x v`` or ``--x=v``), "" if absent."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return ""


def _kv_limits(worker_args: list[str]) -> ReceiverLimits:
    """The workers' ``--kv-*`` bounds, for the KV endpoint a vLLM server's connector binds."""
    from workers.main import add_kv_limit_arguments, receiver_limits

    parser = argparse.ArgumentParser(add_help=False)
    add_kv_limit_arguments(parser)
    return receiver_limits(parser.parse_known_args(worker_args)[0])


def default_vllm_python() -> str:
    """vLLM's interpreter: $PDORCH_VLLM_PYTHON, else the .venv-vllm that scripts/install_vllm.sh makes."""
    configured = os.environ.get("PDORCH_VLLM_PYTHON")
    if configured:
        return configured
    local = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
    if not local.exists():
        raise RuntimeError("vLLM is not installed: run scripts/install_vllm.sh (or set PDORCH_VLLM_PYTHON)")
    return str(local)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive loopback ports free at once (a tensor-parallel vLLM decode
    server's rank r receives KV at its KV port + r)."""
    for _ in range(100):
        base = free_port()
        held: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                held.append(socket.socket())
                held[-1].bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise PdorchError(ErrorCode.CONFIG, f"no {count} consecutive free ports on 127.0.0.1")


_PR_SET_PDEATHSIG = 1


def _stop_with_launcher_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child SIGTERM when the launcher dies (even by
    SIGKILL), so no orphaned cluster keeps its ports; Linux only. The kernel ties that signal to
    the *thread* that forks, so only children spawned from the main thread get it."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded here: the child must not load anything
    launcher = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != launcher:  # the launcher died before the request took effect
            os._exit(1)

    return hook


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal a child and every process it started: each child leads a process group of its own
    (spawned in a new session), and a vLLM server's engine core and worker processes outlive a
    server killed alone (holding its memory and its KV connector's port). A group's number is not
    given to a new process while any member lives; once none does it may be, in time, so a reaped
    leader's group is signalled only soon after it exited (at stop, or before its restart)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def port_is_free(port: int) -> bool:
    """Whether a server could listen on the port now. With SO_REUSEADDR, as the scheduler's HTTP
    server and ZeroMQ bind: a port whose last connections are in TIME_WAIT (a cluster stopped a
    moment ago) is free to them."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
    broker_args: list[str] = field(default_factory=list)
    log_level: str = "INFO"
    # "reference" (the built-in engine), "vllm" (a vLLM server beside each worker) or "sim" (an
    # accelerator's timing and KV sizes modeled; worker_args may carry --sim-* flags).
    engine: str = "reference"
    # A catalogued model's name, a .gguf file or a Hugging Face directory; the reference engine
    # also serves RANDOM_MODEL (seeded random weights, nothing to download). Not read by "sim".
    model: str = DEFAULT_MODEL
    vllm_python: str = ""
    # Worker processes per vLLM server (tensor parallelism); a server's ranks share its core.
    vllm_tensor_parallel_size: int = 1
    # "encrypted" or "plaintext": how the KV plane protects what it carries (both authenticate).
    kv_payload: str = "encrypted"
    # A key set to use (`pdorch keys generate` layout) instead of a throwaway one; keys missing
    # from it (a worker's) are added.
    keys_dir: Path | None = None
    # LoRA adapters may be loaded at run time from under this directory (the scheduler's
    # /v1/load_lora_adapter is on, and every worker may read there); None: off.
    lora_root: Path | None = None


class LocalCluster:
    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        if spec.port == 0:
            spec.port, spec.control_port, spec.broker_port = free_port(), free_port(), free_port()
        self.log_dir = spec.log_dir or Path(tempfile.mkdtemp(prefix="pdorch-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._args: dict[str, list[str]] = {}
        self._envs: dict[str, dict[str, str]] = {}
        self._rpc_dirs: list[Path] = []  # the vLLM servers' IPC socket directories, removed on stop
        self.url = f"http://127.0.0.1:{spec.port}"
        self.model_dir = ""  # the Hugging Face directory served, once resolved by start()
        self.control = f"tcp://127.0.0.1:{spec.control_port}"
        self.broker = f"tcp://127.0.0.1:{spec.broker_port}"
        if spec.keys_dir is not None:
            self.keys = KeySet(spec.keys_dir)
        else:  # throwaway: a new set for every cluster (a --log-dir used before gets a fresh one)
            shutil.rmtree(self.log_dir / "keys", ignore_errors=True)
            self.keys = KeySet.create(self.log_dir / "keys", {})

    def party_env(self, name: str) -> dict[str, str]:
        """The environment that authenticates process ``name`` (a key of its own, made on first use;
        a worker's key may claim its name only)."""
        if not self.keys.key_file(name).exists():
            self.keys.add(name, KeyKind.WORKER)
        return {**self.keys.env(name), "PDORCH_KV_PAYLOAD": self.spec.kv_payload}

    # ------------------------------------------------------------------ processes

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self.spawn(name, [self.spec.python, "-m", "pdorch", *args], {**self.party_env(name), **(env or {})})

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self._args[name] = argv
        self._envs[name] = env
        # The child gets its own copy of the log's descriptor; ours closes at once (restarts of a
        # crashing child must not pile up open files here).
        with open(self.log_dir / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                start_new_session=True,  # Ctrl-C in a terminal goes to us; we stop the children in order
                preexec_fn=_stop_with_launcher_hook(),  # one syscall in the child, before exec
            )

    def worker_names(self) -> list[str]:
        # vLLM servers ("vllm-<worker>") are stopped after their agents, with the scheduler.
        return [n for n in self.procs if n.startswith(("prefill-", "decode-", "worker-"))]

    def model_args(self) -> list[str]:
        """How a reference worker finds the model: by name, or the converted directory of a path."""
        args = ["--model", model_name(self.spec)]
        return [*args, "--weights", self.model_dir] if is_model_path(self.spec.model) else args

    def start_worker(self, name: str, role: str) -> None:
        if self.spec.engine == "vllm":
            engine_args = self._start_vllm(name, role)
        elif self.spec.engine == "sim":
            engine_args = ["--engine", "sim", "--model", model_name(self.spec)]
        else:
            engine_args = self.model_args()
        args = ["worker", "--scheduler", self.control, "--role", role, "--worker-id", name]
        args += ["--log-level", self.spec.log_level, *engine_args, *self.spec.worker_args]
        if self.spec.lora_root is not None:
            args += ["--lora-root", str(self.spec.lora_root)]
        self._spawn(name, args + self.spec.per_worker_args.get(name, []))

    def vllm_spec(
        self, role: str, port: int, kv_bind: str, index: int, kv_arrival_notes: str = ""
    ) -> VllmLaunchSpec:
        """The vLLM server beside the ``index``-th worker (of ``role``), serving the cluster's model;
        a consuming one tells its agent at ``kv_arrival_notes`` that a load's KV is arriving."""
        from workers.engines.vllm.launch import VllmLaunchSpec, context_length

        tp = self.spec.vllm_tensor_parallel_size
        return VllmLaunchSpec(
            model_dir=self.model_dir,
            port=port,
            role=Role(role) if not self.spec.colocated else None,
            kv_bind=kv_bind,
            kv_arrival_notes=kv_arrival_notes,
            # One core per server (round robin), so two servers do not fight over the same one; a
            # tensor-parallel server's ranks share it (spread over the other servers' cores, their
            # steps waited on each other: docs/vllm.md).
            cpu_cores="|".join([str(index % max(1, os.cpu_count() or 1))] * tp),
            tensor_parallel_size=tp,
            served_model_name=model_name(self.spec),
            max_model_len=min(VLLM_MAX_MODEL_LEN, context_length(self.model_dir)),
            # The workers' flag, for the connector that moves the KV inside vLLM.
            kv_same_host=_flag(self.spec.worker_args, "--kv-same-host") or "auto",
            # Adapters loaded at run time need vLLM's LoRA support from the start.
            kv_limits=_kv_limits(self.spec.worker_args),
            enable_lora=self.spec.lora_root is not None or bool(_flag(self.spec.worker_args, "--lora-root")),
        )

    def _start_vllm(self, name: str, role: str) -> list[str]:
        """Start the vLLM server a worker sits beside; returns the worker's engine arguments."""
        # Imported here: only this path needs it (and it never imports vLLM itself).
        from workers.engines.vllm.launch import private_rpc_dir, vllm_command

        port = free_port()
        handoff = not self.spec.colocated
        consumes = handoff and role in ("decode", "both")
        # A tensor-parallel server's rank r binds the port + r.
        kv_bind = f"tcp://127.0.0.1:{free_ports(self.spec.vllm_tensor_parallel_size)}" if consumes else ""
        rpc_dir = private_rpc_dir()
        self._rpc_dirs.append(rpc_dir)
        # In the server's private directory: a path no other process can take meanwhile (a port
        # picked now might be, by vLLM itself, before the agent binds it).
        notes = f"ipc://{rpc_dir}/kv-arrivals" if consumes else ""
        index = len([n for n in self.procs if n.startswith("vllm-")])
        spec = self.vllm_spec(role, port, kv_bind, index, notes)
        python = self.spec.vllm_python or default_vllm_python()
        argv, env = vllm_command(spec, python=python, rpc_dir=rpc_dir)
        # Its KV connector is the worker's KV endpoint: it authenticates with the worker's key.
        self.spawn(f"vllm-{name}", argv, {**env, **self.party_env(name)})
        args = [
            "--engine",
            "vllm",
            "--vllm-url",
            f"http://127.0.0.1:{port}",
            "--model-dir",
            self.model_dir,
        ]
        return [*args, "--kv-advertise", kv_bind, "--vllm-kv-arrival-notes", notes] if consumes else args

    def resolve_model(self) -> None:
        """Find (converting it once, here rather than in every worker at the same time) the model
        directory the workers serve; no network."""
        if self.spec.engine != "sim" and self.spec.model != RANDOM_MODEL:
            try:
                self.model_dir = str(model_dir(self.spec.model))
            except PdorchError as e:
                raise RuntimeError(e.message) from None

    def start(self, timeout_s: float = 60.0) -> None:
        s = self.spec
        self.resolve_model()
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
            self._spawn("kv-broker", ["kv-broker", "--bind", self.broker, *s.broker_args])
            sched += ["--kv-broker", self.broker]
        if s.colocated:
            sched.append("--colocated")
        lora = {"PDORCH_LORA": "{runtime_updates: true}"} if s.lora_root is not None else None
        self._spawn("scheduler", sched, lora)
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
        if self.spec.engine == "vllm":
            timeout_s = max(timeout_s, 300.0)  # vLLM servers take about a minute to load on CPU
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
        """Start a stopped process again with the arguments it had (what the last one left behind,
        such as a crashed vLLM server's engine core, is ended first)."""
        old = self.procs.get(name)
        if old is not None and old.poll() is not None:
            _signal_group(old, signal.SIGKILL)
        self.spawn(name, self._args[name], self._envs[name])

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a process and what it started (a vLLM server with its engine core)."""
        proc = self.procs[name]
        if proc.poll() is None:
            _signal_group(proc, sig)
            proc.wait(10)

    def stop(self, timeout_s: float = 10.0) -> None:
        # Workers first (they drain), then the scheduler and broker.
        order = [*self.worker_names(), *(n for n in self.procs if n not in self.worker_names())]
        running = [self.procs[name] for name in order if self.procs[name].poll() is None]
        for proc in running:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(5)
        for proc in running:  # what they left behind as they exited
            _signal_group(proc, signal.SIGKILL)
        for directory in self._rpc_dirs:
            shutil.rmtree(directory, ignore_errors=True)

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
        "--kv-payload",
        choices=["encrypted", "plaintext"],
        default="encrypted",
        help="KV plane: encrypted (CURVE, default) or plaintext (authenticated only, faster)",
    )
    p.add_argument(
        "--colocated",
        action="store_true",
        help="one worker with role 'both' serves each request whole (no KV handoff), for comparison",
    )
    p.add_argument(
        "--port", type=int, default=8000, help="HTTP port (default 8000; 0: free ports for everything)"
    )
    p.add_argument("--control-port", type=int, default=5555, help="ZeroMQ control port (default 5555)")
    p.add_argument(
        "--broker-port", type=int, default=5700, help="KV broker port, centralized mode (default 5700)"
    )
    p.add_argument(
        "--engine",
        choices=["reference", "vllm", "sim"],
        default="reference",
        help="reference (built in, default), vllm (a vLLM server beside each worker, same model) or "
        "sim (a GPU-timed model without a GPU: for load tests of gateways and autoscalers)",
    )
    p.add_argument(
        "--vllm-tensor-parallel-size",
        type=int,
        default=1,
        metavar="N",
        help="with --engine vllm: worker processes per vLLM server, the model split across them "
        "(default 1; a server's ranks share one core)",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a known model ({', '.join(sorted(CATALOG))}; default {DEFAULT_MODEL}, fetched by "
        f"`make model`), a Llama .gguf file, a Hugging Face Llama directory, or {RANDOM_MODEL} "
        "(reference engine: seeded random weights, nothing to download); sim: the modeled model comes "
        "from the worker flags (-- --sim-model ...)",
    )
    p.add_argument(
        "--log-dir", type=Path, default=None, help="where process logs go (default: a new temp dir)"
    )
    p.add_argument(
        "--lora-root",
        type=Path,
        default=None,
        metavar="DIR",
        help="turn on POST /v1/load_lora_adapter and /v1/unload_lora_adapter, for adapters under DIR",
    )
    p.add_argument("--log-level", default="INFO")
    p.add_argument(
        "worker_args",
        nargs=argparse.REMAINDER,
        help="after --: more arguments for every worker, e.g. -- --sim-time-scale 0 --sim-accelerator a100",
    )


def _example(url: str, model: str) -> str:
    if model == RANDOM_MODEL:  # random weights: any prompt gives gibberish, a chat template none
        body = json.dumps({"model": model, "prompt": "Hello, pdorch", "max_tokens": 16})
        return f"curl -s {url}/v1/completions -H 'Content-Type: application/json' -d '{body}'"
    question = [{"role": "user", "content": "What is the capital of France?"}]
    body = json.dumps({"model": model, "messages": question, "max_tokens": 32, "temperature": 0})
    return f"curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'"


def _spec_problem(spec: ClusterSpec) -> str:
    """What is wrong with a cluster asked for on the command line ("" if nothing)."""
    if spec.engine != "sim":  # a simulated model is named by the sim flags, and needs no weights
        if spec.model == RANDOM_MODEL and spec.engine != "reference":
            return f"--model {RANDOM_MODEL} (random weights) runs on the reference engine only"
        if spec.model in CATALOG:
            if not is_fetched(CATALOG[spec.model]):
                return not_fetched_message(spec.model)
        elif spec.model != RANDOM_MODEL and not Path(spec.model).expanduser().exists():
            known = f"{', '.join(sorted(CATALOG))}, {RANDOM_MODEL}"
            return f"--model {spec.model}: not a known model ({known}), a .gguf file or a directory"
    if spec.vllm_tensor_parallel_size != 1 and (spec.engine != "vllm" or spec.vllm_tensor_parallel_size < 1):
        return f"--vllm-tensor-parallel-size {spec.vllm_tensor_parallel_size}: 1 or more, with --engine vllm"
    if spec.lora_root is not None and not spec.lora_root.is_dir():
        return f"--lora-root {spec.lora_root}: not a directory"
    if spec.prefill < 1 or (spec.decode < 1 and not spec.colocated):
        return "a cluster needs at least one prefill and one decode worker (--prefill, --decode)"
    if not 0 <= spec.port <= 65535:
        return f"--port {spec.port}: ports are 1..65535 (0: free ports for everything)"
    if spec.port:
        ports = {"--port": spec.port, "--control-port": spec.control_port}
        if spec.kv_mode == "centralized" and not spec.colocated:
            ports["--broker-port"] = spec.broker_port
        for flag, port in ports.items():
            if not 1 <= port <= 65535:
                return f"{flag} {port}: ports are 1..65535"
        if len(set(ports.values())) < len(ports):
            return f"{', '.join(ports)} must differ"
    return ""


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
        engine=args.engine,
        model=args.model,
        vllm_tensor_parallel_size=args.vllm_tensor_parallel_size,
        worker_args=[a for a in args.worker_args if a != "--"],
        kv_payload=args.kv_payload,
        lora_root=args.lora_root.expanduser().resolve() if args.lora_root else None,
    )
    problem = _spec_problem(spec)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    cluster = LocalCluster(spec)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    # The children run in sessions of their own (so that Ctrl-C reaches only us and we stop them in
    # order): every signal that ends us must stop them. SIGINT explicitly too, as a shell without
    # job control starts background commands with SIGINT ignored; SIGHUP: the terminal was closed.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
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
            f"\npdorch is ready ({mode}): {cluster.url}\n\n"
            f"Try:\n  {_example(cluster.url, model_name(spec))}\n\n"
            f"Cluster state: {cluster.url}/v1/cluster   Ctrl-C stops everything.\n"
            f"Its processes authenticate with throwaway CURVE keys in {cluster.keys.directory}.",
            flush=True,
        )

        def say(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

        supervisor = Supervisor(cluster.restart, say=say)
        while True:
            supervisor.check(cluster.procs)
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
        return 0
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
