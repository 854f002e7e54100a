"""The argv and environment of a vLLM server process."""

from __future__ import annotations

import json
import stat
import tempfile
import uuid
from pathlib import Path

import pytest

from transport.errors import ErrorCode, PdorchError
from transport.messages import Role
from workers.engines.vllm.client import KEEPALIVE_S
from workers.engines.vllm.launch import (
    SOURCE_ROOT,
    VllmLaunchSpec,
    kv_transfer_config,
    private_rpc_dir,
    vllm_command,
)


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _two_rank_decode(**spec: str) -> VllmLaunchSpec:
    """A decode server of two tensor-parallel ranks, receiving KV at 5601 (rank 1: 5602)."""
    decode = {"role": Role.DECODE, "kv_bind": "tcp://127.0.0.1:5601", "tensor_parallel_size": 2}
    return VllmLaunchSpec(model_dir="/m", port=1, **decode, **spec)


def test_decode_instance_consumes_kv_on_its_endpoint() -> None:
    spec = VllmLaunchSpec(
        model_dir="/m", port=8200, role=Role.DECODE, kv_bind="tcp://127.0.0.1:5601", cpu_cores="1"
    )
    argv, env = vllm_command(spec, python="/venv/bin/python", base_env={"PATH": "/bin", "PYTHONPATH": "/x"})
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert _flag(argv, "--model") == "/m" and _flag(argv, "--port") == "8200"
    assert _flag(argv, "--block-size") == "32" and _flag(argv, "--dtype") == "float32"
    assert "--enforce-eager" in argv
    cfg = json.loads(_flag(argv, "--kv-transfer-config"))
    assert cfg["kv_connector"] == "PdorchConnector"
    assert cfg["kv_connector_module_path"] == "workers.engines.vllm.connector"
    assert cfg["kv_role"] == "kv_consumer"
    assert cfg["kv_load_failure_policy"] == "fail"
    assert cfg["kv_connector_extra_config"]["pdorch_kv_bind"] == "tcp://127.0.0.1:5601"
    assert cfg["kv_connector_extra_config"]["pdorch_kv_same_host"] == "auto"  # shared memory on one host
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_NO_USAGE_STATS"] == "1"
    assert env["PATH"] == "/bin"
    assert env["PYTHONPATH"].split(":") == [str(SOURCE_ROOT), "/x"]


def test_vllm_keeps_idle_connections_far_longer_than_the_agent_reuses_them() -> None:
    # vLLM's default (5 s) is one second above the client's reuse limit: an agent that read an
    # answer a second late wrote its next request on a connection vLLM was closing.
    _, env = vllm_command(VllmLaunchSpec(model_dir="/m", port=1, role=Role.PREFILL), python="py")
    assert int(env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"]) >= 10 * KEEPALIVE_S


def test_prefill_instance_produces_and_binds_nothing() -> None:
    argv, _ = vllm_command(VllmLaunchSpec(model_dir="/m", port=1, role=Role.PREFILL), python="py")
    cfg = json.loads(_flag(argv, "--kv-transfer-config"))
    assert cfg["kv_role"] == "kv_producer"
    assert "pdorch_kv_bind" not in cfg["kv_connector_extra_config"]


def test_plain_instance_has_no_connector_and_base_env_is_not_mutated() -> None:
    base = {"A": "b"}
    argv, env = vllm_command(VllmLaunchSpec(model_dir="/m", port=1, role=None), python="py", base_env=base)
    assert "--kv-transfer-config" not in argv
    assert base == {"A": "b"} and env["A"] == "b"


@pytest.mark.parametrize(
    "spec",
    [
        VllmLaunchSpec(model_dir="/m", port=1, role=Role.DECODE),  # consumer without an endpoint
        VllmLaunchSpec(model_dir="/m", port=1, role=Role.BOTH),
        VllmLaunchSpec(model_dir="/m", port=1, role=None, block_size=16),
        VllmLaunchSpec(model_dir="/m", port=1, role=None, kv_load_failure_policy="ignore"),
        VllmLaunchSpec(model_dir="/m", port=1, role=Role.PREFILL, kv_same_host="sometimes"),
        # A core group per tensor-parallel rank, or auto.
        VllmLaunchSpec(model_dir="/m", port=1, role=Role.PREFILL, tensor_parallel_size=2, cpu_cores="0"),
        VllmLaunchSpec(model_dir="/m", port=1, role=Role.PREFILL, tensor_parallel_size=0),
        # Rank 1 would receive at port + 1: not a port the kernel picks.
        VllmLaunchSpec(
            model_dir="/m", port=1, role=Role.DECODE, kv_bind="tcp://127.0.0.1:0", tensor_parallel_size=2
        ),
        # The arrival notes on rank 1's KV endpoint.
        _two_rank_decode(kv_arrival_notes="tcp://127.0.0.1:5602"),
    ],
)
def test_bad_specs_are_config_errors(spec: VllmLaunchSpec) -> None:
    with pytest.raises(PdorchError) as e:
        vllm_command(spec, python="py")
    assert e.value.code is ErrorCode.CONFIG


def test_lora_adapters_enable_lora_with_their_modules() -> None:
    spec = VllmLaunchSpec(
        model_dir="/m", port=1, role=None, loras={"sql": "/a/sql", "poem": "/a/poem"}, max_lora_rank=8
    )
    argv, env = vllm_command(spec, python="py")
    assert "--enable-lora" in argv
    assert argv[argv.index("--max-lora-rank") + 1] == "8"
    modules = argv[argv.index("--lora-modules") + 1 :]
    assert modules[:2] == ["sql=/a/sql", "poem=/a/poem"]
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"  # the agent loads more at run time
    plain, plain_env = vllm_command(VllmLaunchSpec(model_dir="/m", port=1, role=None), python="py")
    assert "--enable-lora" not in plain and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in plain_env


def test_lora_can_be_on_with_no_adapter_at_start() -> None:
    argv, env = vllm_command(VllmLaunchSpec(model_dir="/m", port=1, role=None, enable_lora=True), python="py")
    assert "--enable-lora" in argv and "--lora-modules" not in argv
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_the_workers_kv_bounds_reach_the_connectors_endpoint() -> None:
    """`pdorch up --engine vllm -- --kv-max-waiting 4`: the launcher's spec carries the workers'
    --kv-* flags into the connector's extra config, which reads them back as they were."""
    import msgspec

    from pdorch.launcher import _kv_limits
    from transport.kv.receiver import ReceiverLimits

    limits = _kv_limits(["--kv-max-waiting", "4", "--kv-wait-s=2.5", "--sim-other", "x"])
    assert (limits.max_parked, limits.park_s, limits.max_active) == (4, 2.5, ReceiverLimits().max_active)
    spec = VllmLaunchSpec(
        model_dir="/m", port=1, role=Role.DECODE, kv_bind="tcp://127.0.0.1:1", kv_limits=limits
    )
    extra = kv_transfer_config(spec)["kv_connector_extra_config"]
    assert msgspec.convert(extra["pdorch_kv_limits"], ReceiverLimits) == limits  # type: ignore[index]


@pytest.mark.parametrize("bad", [{"max_active": 0}, {"max_parked_per_peer": -1}, {"park_s": 0.0}])
def test_kv_bounds_must_be_positive(bad: dict[str, float]) -> None:
    from transport.kv.receiver import ReceiverLimits

    with pytest.raises(PdorchError) as e:
        ReceiverLimits(**bad)  # type: ignore[arg-type]
    assert e.value.code is ErrorCode.CONFIG


def test_a_server_gets_its_own_directory_for_its_ipc_sockets(tmp_path: Path) -> None:
    spec = VllmLaunchSpec(model_dir="/m", port=1, role=None)
    _, env = vllm_command(spec, python="py", rpc_dir=tmp_path)
    assert env["VLLM_RPC_BASE_PATH"] == str(tmp_path)
    _, default = vllm_command(spec, python="py")
    assert "VLLM_RPC_BASE_PATH" not in default


def test_the_ipc_directory_is_private_and_leaves_room_for_socket_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = private_rpc_dir()
    try:
        assert directory.is_dir() and stat.S_IMODE(directory.stat().st_mode) == 0o700
    finally:
        directory.rmdir()
    # A temp dir so deep that vLLM's <dir>/<uuid4> socket paths would pass 107 bytes.
    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    directory = private_rpc_dir()
    try:
        assert len(f"{directory}/{uuid.uuid4()}") <= 107
    finally:
        directory.rmdir()


def test_a_consumer_tells_its_agent_where_its_kv_arrives_and_a_producer_does_not() -> None:
    notes = "ipc:///run/pdorch-vllm-x/kv-arrivals"
    consumer = VllmLaunchSpec(
        model_dir="/m", port=1, role=Role.DECODE, kv_bind="tcp://127.0.0.1:5601", kv_arrival_notes=notes
    )
    assert kv_transfer_config(consumer)["kv_connector_extra_config"]["pdorch_kv_arrival_notes"] == notes
    producer = VllmLaunchSpec(model_dir="/m", port=1, role=Role.PREFILL, kv_arrival_notes=notes)
    assert "pdorch_kv_arrival_notes" not in kv_transfer_config(producer)["kv_connector_extra_config"]
    unset = VllmLaunchSpec(model_dir="/m", port=1, role=Role.DECODE, kv_bind="tcp://127.0.0.1:5601")
    assert "pdorch_kv_arrival_notes" not in kv_transfer_config(unset)["kv_connector_extra_config"]


def test_a_tensor_parallel_server_gets_its_size_a_core_group_per_rank_and_no_compilation() -> None:
    argv, env = vllm_command(
        _two_rank_decode(kv_arrival_notes="tcp://127.0.0.1:5600", cpu_cores="0|1"), python="py"
    )
    assert _flag(argv, "--tensor-parallel-size") == "2"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    # Eager: vLLM's few torch.compile'd helpers would otherwise compile C++ on their first call.
    assert env["TORCHDYNAMO_DISABLE"] == "1"
    one, _ = vllm_command(VllmLaunchSpec(model_dir="/m", port=1, role=Role.PREFILL), python="py")
    assert "--tensor-parallel-size" not in one
