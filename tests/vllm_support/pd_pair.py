"""A prefill and a decode vLLM server with pdorch's connector (plus a KV broker), and the engine
adapters that drive them exactly as worker agents do: what the vLLM P/D tests share."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pdorch.launcher import ClusterSpec, LocalCluster, free_port, free_ports
from tests.vllm_support.processes import VllmServer, wait_healthy
from transport import sockets
from transport.kv.broker_cli import listening_endpoint
from transport.kv.receiver import ReceiverLimits
from transport.messages import (
    DecodeJob,
    FinishReason,
    FromWorker,
    GenerateJob,
    KvLoaded,
    KvMode,
    KvRoute,
    PrefillJob,
    Role,
    SamplingParams,
    TokenOutput,
)
from transport.security import Security, SecurityConfig
from transport.security.key_set import KV_BROKER, KeySet
from transport.security.keys import read_public
from workers.engines.vllm.engine import VllmEngine
from workers.engines.vllm.kv_arrivals import ArrivalListener
from workers.engines.vllm.launch import VllmLaunchSpec, private_rpc_dir
from workers.models.catalog import RANDOM_MODEL


@dataclass
class Cluster:
    prefill: VllmServer
    decode: VllmServer
    model_dir: Path
    kv_endpoint: str
    broker: str
    keys: KeySet
    broker_log: Path
    # Where the decode server's connector says a load's KV is arriving (the agent listens).
    arrival_notes: str = ""
    prompts: list[list[int]] = field(default_factory=list)

    def notable_logs(self, lines: int = 25) -> str:
        """The last warnings and errors of both servers and the broker: what explains a failure."""
        servers = (self.decode, self.prefill)
        parts = [f"--- vLLM {v.name}:\n{v.log_tail(lines, notable_only=True)}" for v in servers]
        broker = self.broker_log.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join([*parts, "--- KV broker:", *broker])

    def route(self, mode: str, tid: str, endpoint: str = "") -> KvRoute:
        """As the scheduler names it: in the prefill side's scope, pinning the server's key."""
        p2p = mode == KvMode.P2P
        server = "decode-0" if p2p else KV_BROKER
        key = read_public(self.keys.trusted_dir / f"{server}.pub").public
        endpoint = endpoint or (self.kv_endpoint if p2p else self.broker)
        return KvRoute(KvMode(mode), endpoint, f"prefill-0/{tid}", key)


# The CI machines were seen stalling for 5-10 s and more mid-test; the KV planes' bounds against
# silent or hostile peers (tested on real sockets in tests/integration) would then fail requests
# these tests only compare. Patient, within the jobs' own 60 s deadline.
PATIENT_LIMITS = ReceiverLimits(park_s=60.0, idle_s=60.0)
# Its counters every few seconds: the last of them explain a failed centralized handoff.
PATIENT_BROKER = ["--first-chunk-s", "60", "--idle-s", "60", "--stats-interval-s", "5"]


def _start_broker(log_path: Path, keys: KeySet) -> tuple[subprocess.Popen[bytes], str]:
    """The broker on a port of its own choosing (no window in which another process can take a
    port picked for it), and the endpoint it says it listens on."""
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdorch", "kv-broker", "--bind", "tcp://127.0.0.1:0", *PATIENT_BROKER],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **keys.env(KV_BROKER)},
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log_path.read_text(errors="replace").splitlines():
            if (endpoint := listening_endpoint(line)) is not None:
                return proc, endpoint
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"the KV broker did not start:\n{log_path.read_text(errors='replace')}")


@contextmanager
def pd_servers(
    python: Path, model_dir: Path, work: Path, *, tensor_parallel_size: int = 1, **spec: object
) -> Iterator[Cluster]:
    """Both servers (one core each, shared by a tensor-parallel server's ranks) and a broker,
    healthy; stopped by PID on the way out. Each has the CURVE keys of the party it stands for
    (named as the agents pdorch_in_front puts in front of them: the same keys serve both)."""
    keys = KeySet.create(work / "keys", {"prefill-0": (), "decode-0": ()})
    broker_log = work / "kv-broker.log"
    # First: the ports picked for the servers below are then not the one it chose.
    broker, broker_endpoint = _start_broker(broker_log, keys)
    kv_port = free_ports(tensor_parallel_size)  # rank r receives at kv_port + r
    notes_dir = private_rpc_dir()  # a path, not a port another process could take meanwhile
    notes = f"ipc://{notes_dir}/kv-arrivals"
    common: dict = {
        "model_dir": str(model_dir),
        "kv_limits": PATIENT_LIMITS,
        "tensor_parallel_size": tensor_parallel_size,
        **spec,
    }
    # Each server on a core of its own, its ranks sharing it.
    cores = tuple("|".join([c] * tensor_parallel_size) for c in ("0", "1"))
    servers: list[VllmServer] = []
    try:
        prefill = VllmServer(
            "prefill",
            VllmLaunchSpec(port=free_port(), role=Role.PREFILL, cpu_cores=cores[0], **common),
            python=python,
            log_dir=work,
            env=keys.env("prefill-0"),
        )
        servers.append(prefill)
        decode_spec = VllmLaunchSpec(
            port=free_port(),
            role=Role.DECODE,
            cpu_cores=cores[1],
            kv_bind=f"tcp://127.0.0.1:{kv_port}",
            kv_arrival_notes=notes,
            **common,
        )
        decode = VllmServer("decode", decode_spec, python=python, log_dir=work, env=keys.env("decode-0"))
        servers.append(decode)
        wait_healthy(servers, timeout_s=420)
        yield Cluster(
            prefill,
            decode,
            model_dir,
            f"tcp://127.0.0.1:{kv_port}",
            broker_endpoint,
            keys,
            broker_log,
            notes,
        )
    finally:
        for server in servers:
            server.stop()
        broker.terminate()
        broker.wait(timeout=10)
        shutil.rmtree(notes_dir, ignore_errors=True)


class Collector:
    """The ``emit`` side of an engine: everything it reported, per request."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = defaultdict(list)
        self.finish: dict[str, FinishReason | None] = {}
        self.kv_loaded: set[str] = set()
        self.first_token: dict[str, int] = {}
        self.order: list[FromWorker] = []

    def __call__(self, msg: FromWorker) -> None:
        self.order.append(msg)
        if isinstance(msg, TokenOutput):
            assert msg.request_id not in self.finish, "tokens after the finish"
            self.tokens[msg.request_id] += msg.token_ids
            if msg.finish_reason is not None:
                self.finish[msg.request_id] = msg.finish_reason
        elif isinstance(msg, KvLoaded):
            self.kv_loaded.add(msg.request_id)
            self.first_token[msg.request_id] = msg.first_token


@dataclass
class Engines:
    prefill: VllmEngine
    decode: VllmEngine
    p_out: Collector
    d_out: Collector


@asynccontextmanager
async def pd_engines(cluster: Cluster) -> AsyncIterator[Engines]:
    p_out, d_out = Collector(), Collector()
    # As the decode agent does: its key, on its context.
    ctx = sockets.new_context()
    keys = cluster.keys
    security = Security.load(
        SecurityConfig(key_file=str(keys.key_file("decode-0")), trusted_keys=str(keys.trusted_dir))
    )
    prefill = VllmEngine(cluster.prefill.url, model_dir=str(cluster.model_dir), metrics_interval_s=0.2)
    decode = VllmEngine(
        cluster.decode.url,
        model_dir=str(cluster.model_dir),
        metrics_interval_s=0.2,
        kv_endpoint=cluster.kv_endpoint,
        arrivals=ArrivalListener(ctx, cluster.arrival_notes, security),
    )
    try:
        await prefill.start(p_out)
        await decode.start(d_out)
        yield Engines(prefill, decode, p_out, d_out)
    finally:
        await prefill.close()
        await decode.close()
        security.close()
        ctx.destroy(linger=0)


async def colocated(
    engine: VllmEngine, out: Collector, rid: str, prompt: list[int], s: SamplingParams, adapter: str = ""
) -> list[int]:
    await engine.generate(GenerateJob(rid, prompt, s, adapter=adapter))
    return out.tokens[rid]


async def disaggregated(
    e: Engines,
    rid: str,
    prompt: list[int],
    s: SamplingParams,
    route: KvRoute,
    *,
    decode_first: bool,
    generated: int = 0,
    adapter: str = "",
) -> list[int]:
    prefill = PrefillJob(rid, prompt, s, route, deadline_s=60, generated=generated, adapter=adapter)
    decode = DecodeJob(rid, prompt, s, route, deadline_s=60, generated=generated, adapter=adapter)
    if decode_first:
        await asyncio.gather(e.decode.decode(decode), e.prefill.prefill(prefill))
    else:  # the decode job arrives after the KV was pushed
        await e.prefill.prefill(prefill)
        await e.decode.decode(decode)
    first = e.p_out.tokens[rid]
    assert len(first) == 1, "prefill emits exactly token 0"
    assert rid in e.d_out.kv_loaded
    assert e.d_out.first_token[rid] == first[0], "decode's token 0 (from the loaded KV) equals prefill's"
    return first + e.d_out.tokens[rid]


def route(mode: str, cluster: Cluster, tid: str) -> KvRoute:
    return cluster.route(mode, tid)


async def check_equality(cluster: Cluster, e: Engines, s: SamplingParams, tag: str, mode: str) -> None:
    """Every prompt of ``cluster``: disaggregated (in ``mode``, all at once) == colocated."""
    expected = [
        await colocated(e.prefill, e.p_out, f"{tag}-c{i}", p, s) for i, p in enumerate(cluster.prompts)
    ]
    try:
        got = await asyncio.gather(
            *(
                disaggregated(
                    e,
                    f"{tag}-{mode}{i}",
                    p,
                    s,
                    route(mode, cluster, f"{tag}-{mode}-{i}"),
                    decode_first=i % 2 == 0,
                )
                for i, p in enumerate(cluster.prompts)
            )
        )
    except Exception as exc:  # what the servers said is the only clue to a crash inside vLLM
        raise AssertionError(f"{tag}: {exc!r}\n{cluster.notable_logs()}") from exc
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert have == want, f"prompt {i} ({len(cluster.prompts[i])} tokens): {have} != {want}"


@contextmanager
def pdorch_in_front(cluster: Cluster, kv_mode: str, log_dir: Path) -> Iterator[LocalCluster]:
    """pdorch's scheduler and two worker agents (``pdorch worker --engine vllm``) in front of the
    pair's servers, in one KV mode."""
    model = ["--engine", "vllm", "--model-dir", str(cluster.model_dir)]
    spec = ClusterSpec(
        port=0,
        kv_mode=kv_mode,
        log_dir=log_dir,
        log_level="WARNING",
        keys_dir=cluster.keys.directory,
        # The workers' engine and model come from their own arguments: the launcher only spawns
        # agents here (the vLLM servers already run), so its model choice is left at the one that
        # needs nothing.
        model=RANDOM_MODEL,
        per_worker_args={
            "prefill-0": [*model, "--vllm-url", cluster.prefill.url],
            "decode-0": [*model, "--vllm-url", cluster.decode.url, "--kv-advertise", cluster.kv_endpoint],
        },
    )
    stack = LocalCluster(spec)
    try:
        stack.start(timeout_s=120)
        yield stack
    finally:
        stack.stop()
