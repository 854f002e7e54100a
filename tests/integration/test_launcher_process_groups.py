"""The launcher ends what its children started, not only the children: a vLLM server runs its
engine core and workers as processes of its own, and those outlive a server killed alone (holding
its memory and its KV connector's port, so a restarted server could not bind it).

The child here is a stand-in that starts a process of its own, as vLLM's server does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdorch.launcher import ClusterSpec, LocalCluster

_STAND_IN = """
import os, signal, sys, time
mode, pid_file = sys.argv[1], sys.argv[2]
if mode == "crash" and os.path.exists(pid_file + ".crashed"):  # restarted: serve this time
    mode = "serve"
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.fork() == 0:
    with open(pid_file + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(pid_file + ".tmp", pid_file)
    time.sleep(600)
    os._exit(0)
if mode == "crash":  # the server dies, its engine stays
    while not os.path.exists(pid_file):
        time.sleep(0.01)
    open(pid_file + ".crashed", "w").close()
    os._exit(1)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # an orphan's zombie waits for whoever adopted it


# Every stand-in child seen, ended at teardown if a failing test left it running.
_children: list[int] = []


def _started_child(pid_file: Path) -> int:
    deadline = time.monotonic() + 30
    while not pid_file.exists():
        assert time.monotonic() < deadline, "the stand-in did not start its child"
        time.sleep(0.02)
    pid = int(pid_file.read_text())
    _children.append(pid)
    return pid


def _gone(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    yield LocalCluster(ClusterSpec(port=0, log_dir=tmp_path / "logs"))
    while _children:
        pid = _children.pop()
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _spawn(cluster: LocalCluster, pid_file: Path, mode: str) -> int:
    """A stand-in server as ``vllm-decode-0``; returns its child's pid (written to ``pid_file``)."""
    cluster.spawn("vllm-decode-0", [sys.executable, "-c", _STAND_IN, mode, str(pid_file)], {})
    return _started_child(pid_file)


def test_killing_a_server_kills_what_it_started(cluster: LocalCluster, tmp_path: Path) -> None:
    child = _spawn(cluster, tmp_path / "child.pid", "serve")
    try:
        cluster.kill("vllm-decode-0")
        assert _gone(child)
    finally:
        cluster.stop()


def test_stopping_ends_what_ignores_the_polite_signal(cluster: LocalCluster, tmp_path: Path) -> None:
    child = _spawn(cluster, tmp_path / "child.pid", "stubborn")
    cluster.stop(timeout_s=0.5)
    assert _gone(child)
    assert cluster.procs["vllm-decode-0"].poll() is not None


def test_a_restart_ends_what_the_dead_server_left_behind(cluster: LocalCluster, tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    orphan = _spawn(cluster, pid_file, "crash")
    try:
        cluster.procs["vllm-decode-0"].wait(10)
        assert _alive(orphan), "the stand-in's child outlives it, as vLLM's engine core does"
        pid_file.unlink()
        cluster.restart("vllm-decode-0")
        child = _started_child(pid_file)
        assert _gone(orphan)
        assert child != orphan and cluster.procs["vllm-decode-0"].poll() is None
    finally:
        cluster.stop()
    assert _gone(child)
