"""Each vLLM server the launchers start keeps its IPC sockets in a directory of its own, removed
when it stops (vLLM otherwise leaves them in the system's temp directory on every run).

The server here is a stand-in that does what vLLM does with ``VLLM_RPC_BASE_PATH`` (binds a Unix
socket under it); the real vLLM tests check that vLLM's sockets land there.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from pdorch.launcher import ClusterSpec, LocalCluster
from tests.vllm_support.processes import VllmServer
from workers.engines.vllm.launch import VllmLaunchSpec

_BINDS = (
    "import os, socket, time\n"
    "s = socket.socket(socket.AF_UNIX)\n"
    "s.bind(os.path.join(os.environ['VLLM_RPC_BASE_PATH'], 'engine-core'))\n"
    "time.sleep(60)\n"
)


def _stand_in(tmp_path: Path) -> Path:
    """An interpreter for the launchers that ignores their vLLM arguments and binds a socket."""
    script = tmp_path / "vllm-python"
    script.write_text(f'#!/bin/sh\nexec {sys.executable} -c "{_BINDS}"\n')
    script.chmod(0o755)
    return script


def _wait_for_socket(directory: Path) -> None:
    deadline = time.monotonic() + 30
    while not (directory / "engine-core").is_socket():
        assert time.monotonic() < deadline, f"no socket appeared in {directory}"
        time.sleep(0.05)


def test_the_launcher_gives_each_vllm_server_a_socket_dir_and_removes_it(tmp_path: Path) -> None:
    spec = ClusterSpec(port=0, engine="vllm", vllm_python=str(_stand_in(tmp_path)), log_dir=tmp_path / "logs")
    cluster = LocalCluster(spec)
    try:
        cluster.start_worker("prefill-0", "prefill")
        cluster.start_worker("decode-0", "decode")
        dirs = [Path(cluster._envs[f"vllm-{n}"]["VLLM_RPC_BASE_PATH"]) for n in ("prefill-0", "decode-0")]
        assert len(set(dirs)) == 2
        for directory in dirs:
            _wait_for_socket(directory)
        # The decode agent hears that a load's KV is arriving at a path in its server's directory,
        # the one its server's connector is told.
        agent, server = cluster.procs["decode-0"].args, cluster.procs["vllm-decode-0"].args
        notes = agent[agent.index("--vllm-kv-arrival-notes") + 1]
        assert notes == f"ipc://{dirs[1]}/kv-arrivals"
        extra = json.loads(server[server.index("--kv-transfer-config") + 1])["kv_connector_extra_config"]
        assert extra["pdorch_kv_arrival_notes"] == notes
        assert "--vllm-kv-arrival-notes" not in cluster.procs["prefill-0"].args
    finally:
        cluster.stop()
    assert not any(d.exists() for d in dirs)


def test_a_test_server_removes_its_socket_dir_on_stop(tmp_path: Path) -> None:
    spec = VllmLaunchSpec(model_dir=str(tmp_path), port=1, role=None)
    server = VllmServer("x", spec, python=_stand_in(tmp_path), log_dir=tmp_path)
    try:
        _wait_for_socket(server.rpc_dir)
        assert os.stat(server.rpc_dir).st_mode & 0o077 == 0
    finally:
        server.stop()
    assert not server.rpc_dir.exists()


def test_the_launcher_starts_tensor_parallel_servers_with_a_kv_port_per_rank(tmp_path: Path) -> None:
    """``pdorch up --engine vllm --vllm-tensor-parallel-size 2``: each server split over two ranks
    sharing its core, the decode server's KV port and the next one free for its two ranks, and its
    agent advertising rank 0's (the prefill ranks derive the rest)."""
    spec = ClusterSpec(
        port=0,
        engine="vllm",
        vllm_python=str(_stand_in(tmp_path)),
        vllm_tensor_parallel_size=2,
        log_dir=tmp_path / "logs",
    )
    cluster = LocalCluster(spec)
    try:
        cluster.start_worker("prefill-0", "prefill")
        cluster.start_worker("decode-0", "decode")
        for name in ("prefill-0", "decode-0"):
            server = cluster.procs[f"vllm-{name}"].args
            assert server[server.index("--tensor-parallel-size") + 1] == "2"
            cores = cluster._envs[f"vllm-{name}"]["VLLM_CPU_OMP_THREADS_BIND"].split("|")
            assert len(cores) == 2 and cores[0] == cores[1]
        server = cluster.procs["vllm-decode-0"].args
        bind = json.loads(server[server.index("--kv-transfer-config") + 1])["kv_connector_extra_config"][
            "pdorch_kv_bind"
        ]
        agent = cluster.procs["decode-0"].args
        assert agent[agent.index("--kv-advertise") + 1] == bind
        port = int(bind.rsplit(":", 1)[1])
        for rank_port in (port, port + 1):  # nothing took them (the stand-in binds no KV port)
            with socket.create_server(("127.0.0.1", rank_port)):
                pass
    finally:
        cluster.stop()
