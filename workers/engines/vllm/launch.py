"""How to start a vLLM server process that pdorch can drive: argv and environment, nothing run.

``vllm_command(spec)`` is pure; launchers (``pdorch up --engine vllm``, tests, benchmarks) spawn
the result with the vLLM environment's interpreter, each server with a directory of its own for
vLLM's IPC sockets (``private_rpc_dir``) that they remove when it stops. Defaults suit a CPU
host: eager mode (graph compilation is slow on few cores), float32, 32-token blocks, a small
context and batch, an explicit KV cache size (vLLM's memory guard otherwise applies a GPU fraction
to host RAM) and offline operation (no model hub, no usage reporting).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import msgspec

from transport.errors import ErrorCode, PdorchError
from transport.kv.receiver import DEFAULT_LIMITS, ReceiverLimits
from transport.messages import Role
from workers.engines.vllm.transfer_params import rank_endpoint

CONNECTOR_CLASS = "PdorchConnector"
CONNECTOR_MODULE = "workers.engines.vllm.connector"
# The repository root, so the connector module imports in vLLM's spawned processes even when pdorch
# is not installed into the vLLM environment.
SOURCE_ROOT = Path(__file__).resolve().parents[3]

_KV_ROLE = {Role.PREFILL: "kv_producer", Role.DECODE: "kv_consumer", Role.BOTH: "kv_both"}

# How long vLLM's HTTP server keeps an idle connection (VLLM_HTTP_TIMEOUT_KEEP_ALIVE, default 5 s).
# The agent's client reuses one only while it has been idle under KEEPALIVE_S (4 s), counted from
# when it read the last answer; on a loaded host it may read that answer seconds after vLLM sent it,
# and a request then written on a connection the server is closing fails as "Server disconnected".
# Far above the client's limit, that lag cannot close the gap.
SERVER_KEEPALIVE_S = 60

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


class VllmLaunchSpec(msgspec.Struct, kw_only=True, frozen=True):
    model_dir: str
    port: int
    # prefill -> KV producer, decode -> KV consumer, both -> either; None: no connector at all
    # (a plain colocated vLLM).
    role: Role | None = Role.BOTH
    host: str = "127.0.0.1"
    # Where a consuming instance's connector binds its KV receiver (it must equal the endpoint the
    # agent advertises, modulo the host part behind NAT).
    kv_bind: str = ""
    # Where a consuming instance's connector tells its agent that a load's KV is arriving (the
    # agent's --vllm-kv-arrival-notes; ipc:// or loopback). "": it does not, and a handoff into it is judged
    # stalled by its first token alone.
    kv_arrival_notes: str = ""
    kv_cache_gib: int = 1
    # VLLM_CPU_OMP_THREADS_BIND: "auto", or the cores for this instance ("0", "1", "0-3"), one
    # group per tensor-parallel rank ("0|1").
    cpu_cores: str = "auto"
    # Worker processes the model (and each request's KV) is split across. A decode instance's rank
    # r receives its part at kv_bind's port + r (transfer_params.rank_endpoint), and both pools must
    # use the same size.
    tensor_parallel_size: int = 1
    block_size: int = 32
    max_model_len: int = 512
    max_num_seqs: int = 8
    dtype: str = "float32"
    enforce_eager: bool = True
    served_model_name: str = ""
    # "fail": a failed KV load fails the request (the scheduler sees it and may retry);
    # "recompute": vLLM silently recomputes the prompt instead.
    kv_load_failure_policy: str = "fail"
    max_lease_s: float = 120.0
    # LoRA adapters to serve, name -> PEFT directory (vLLM's --enable-lora --lora-modules), and
    # the largest rank and the number resident at once.
    loras: dict[str, str] = {}
    # Serve LoRA even with no adapter at start (they can be loaded at run time); implied by loras.
    enable_lora: bool = False
    max_lora_rank: int = 16
    max_loras: int = 4
    # The connector's same-host KV path (auto, on, off), as ``pdorch worker --kv-same-host``.
    kv_same_host: str = "auto"
    # What the connector's KV endpoint admits (a decode instance's), as ``pdorch worker --kv-*``.
    kv_limits: ReceiverLimits = DEFAULT_LIMITS
    extra_args: list[str] = []


# A Unix socket's path stops at 107 bytes; vLLM names its sockets <base>/<uuid4> (37 more).
_MAX_RPC_BASE = 107 - 37


def private_rpc_dir() -> Path:
    """A new directory (mode 0700) for one vLLM server's IPC sockets (``VLLM_RPC_BASE_PATH``).

    vLLM otherwise leaves a few socket files in the system's temp directory on every run; the
    launcher removes this one when the server stops. Under ``/tmp`` when the temp directory's own
    path would leave the sockets' paths too long.
    """
    base = tempfile.gettempdir()
    if len(base) + len("/pdorch-vllm-xxxxxxxx") > _MAX_RPC_BASE and os.path.isdir("/tmp"):
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix="pdorch-vllm-", dir=base))


def context_length(model_dir: str) -> int:
    """The model's own context length (``max_position_embeddings``), 512 if its config lacks it."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        return int(config["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return 512


def kv_transfer_config(spec: VllmLaunchSpec) -> dict[str, object]:
    assert spec.role is not None
    extra: dict[str, object] = {
        "pdorch_max_lease_s": spec.max_lease_s,
        "pdorch_kv_same_host": spec.kv_same_host,
        "pdorch_kv_limits": msgspec.structs.asdict(spec.kv_limits),
    }
    if spec.role in (Role.DECODE, Role.BOTH):
        if not spec.kv_bind:
            raise PdorchError(
                ErrorCode.CONFIG, f"a {spec.role} vLLM needs kv_bind (its KV receiver endpoint)"
            )
        extra["pdorch_kv_bind"] = spec.kv_bind
        ranks = [rank_endpoint(spec.kv_bind, r) for r in range(spec.tensor_parallel_size)]
        if spec.kv_arrival_notes in ranks:
            raise PdorchError(
                ErrorCode.CONFIG,
                f"kv_arrival_notes {spec.kv_arrival_notes!r} is one of the ranks' KV endpoints {ranks}",
            )
        if spec.kv_arrival_notes:
            extra["pdorch_kv_arrival_notes"] = spec.kv_arrival_notes
    return {
        "kv_connector": CONNECTOR_CLASS,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": _KV_ROLE[spec.role],
        "kv_load_failure_policy": spec.kv_load_failure_policy,
        "kv_connector_extra_config": extra,
    }


def vllm_command(
    spec: VllmLaunchSpec,
    *,
    python: str,
    base_env: Mapping[str, str] | None = None,
    rpc_dir: Path | None = None,
) -> tuple[list[str], dict[str, str]]:
    """(argv, env) for one vLLM OpenAI server. ``base_env`` is extended, never mutated; ``rpc_dir``:
    where its IPC sockets go (from :func:`private_rpc_dir`; None: vLLM's default, the temp dir)."""
    if spec.kv_load_failure_policy not in ("fail", "recompute"):
        raise PdorchError(
            ErrorCode.CONFIG,
            f"kv_load_failure_policy must be fail or recompute, not {spec.kv_load_failure_policy!r}",
        )
    if spec.kv_same_host not in ("auto", "on", "off"):
        raise PdorchError(
            ErrorCode.CONFIG, f"kv_same_host must be auto, on or off, not {spec.kv_same_host!r}"
        )
    groups = len(spec.cpu_cores.split("|"))
    if spec.tensor_parallel_size < 1 or (spec.cpu_cores != "auto" and groups != spec.tensor_parallel_size):
        raise PdorchError(
            ErrorCode.CONFIG,
            f"cpu_cores {spec.cpu_cores!r} names {groups} core groups for tensor_parallel_size "
            f"{spec.tensor_parallel_size} (one per rank, '|' between them, or auto)",
        )
    if spec.block_size % 32:
        raise PdorchError(
            ErrorCode.CONFIG,
            f"vLLM on CPU needs a block size that is a multiple of 32, not {spec.block_size}",
        )
    argv = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", spec.model_dir,
        "--host", spec.host,
        "--port", str(spec.port),
        "--block-size", str(spec.block_size),
        "--dtype", spec.dtype,
        "--max-model-len", str(spec.max_model_len),
        "--max-num-seqs", str(spec.max_num_seqs),
    ]  # fmt: skip
    if spec.tensor_parallel_size > 1:
        argv += ["--tensor-parallel-size", str(spec.tensor_parallel_size)]
    if spec.enforce_eager:
        argv.append("--enforce-eager")
    if spec.served_model_name:
        argv += ["--served-model-name", spec.served_model_name]
    if spec.role is not None:
        argv += ["--kv-transfer-config", json.dumps(kv_transfer_config(spec))]
    lora = spec.enable_lora or bool(spec.loras)
    if lora:
        argv += [
            "--enable-lora",
            "--max-lora-rank",
            str(spec.max_lora_rank),
            "--max-loras",
            str(spec.max_loras),
        ]
    if spec.loras:
        argv += ["--lora-modules", *(f"{name}={path}" for name, path in spec.loras.items())]
    argv += list(spec.extra_args)

    env = dict(base_env or {})
    env.update(OFFLINE_ENV)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(spec.kv_cache_gib)
    env["VLLM_CPU_OMP_THREADS_BIND"] = spec.cpu_cores
    env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] = str(SERVER_KEEPALIVE_S)
    if spec.enforce_eager:
        # Eager all the way: vLLM still wraps a few small functions in torch.compile (with tensor
        # parallelism, the vocabulary embedding's masking), and their first call then compiles C++
        # with the system compiler, a minute or more per worker process on a small CPU host.
        env["TORCHDYNAMO_DISABLE"] = "1"
    if rpc_dir is not None:
        env["VLLM_RPC_BASE_PATH"] = str(rpc_dir)
    if lora:
        # /v1/load_lora_adapter and /v1/unload_lora_adapter: the agent is vLLM's only client,
        # and it loads only from the worker's allowed adapter directories.
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    paths = [p for p in env.get("PYTHONPATH", "").split(":") if p]
    if str(SOURCE_ROOT) not in paths:
        env["PYTHONPATH"] = ":".join([str(SOURCE_ROOT), *paths])
    return argv, env
