"""`pdorch up`, the command behind `make run`: ready banner, a working URL serving the default model
(a real one), and a clean stop on a signal."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pdorch.launcher import free_port
from tests.support.real_model import default_model_dir
from workers.models.catalog import DEFAULT_MODEL

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 120  # generous: a shared 2-core machine
STOP_TIMEOUT_S = 60


def _children(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _read_until_ready(proc: subprocess.Popen[str], lines: list[str]) -> str:
    """The URL from the ready banner; fails if it does not come in time."""
    ready = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "is ready" in line:
                ready.set()

    threading.Thread(target=reader, daemon=True).start()
    if not ready.wait(READY_TIMEOUT_S):
        pytest.fail(f"pdorch up not ready in {READY_TIMEOUT_S}s; output:\n{''.join(lines)}")
    match = re.search(r"http://127\.0\.0\.1:\d+", "".join(lines))
    assert match, "".join(lines)
    return match.group(0)


@dataclass
class _Up:
    proc: subprocess.Popen[str]
    lines: list[str]
    url: str
    children: list[int]

    def left_behind(self, timeout_s: float) -> list[int]:
        """The children still alive once they had ``timeout_s`` to exit."""
        deadline = time.monotonic() + timeout_s
        while any(_alive(pid) for pid in self.children) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [pid for pid in self.children if _alive(pid)]


@pytest.fixture(autouse=True, scope="module")
def _default_model() -> None:
    default_model_dir()  # what `make run` fetches before `pdorch up`


def _post(url: str, path: str, body: dict[str, object]) -> dict:
    request = urllib.request.Request(
        url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        return json.load(response)


@contextlib.contextmanager
def _ready_cluster(log_dir: Path, *, sigint_ignored: bool = False) -> Iterator[_Up]:
    """`pdorch up` on free ports, once ready; whatever happens after, nothing is left running."""
    command = [sys.executable, "-m", "pdorch", "up", "--port", str(free_port())]
    command += ["--control-port", str(free_port()), "--log-dir", str(log_dir), "--log-level", "WARNING"]

    def preexec() -> None:
        if sigint_ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    out = subprocess.PIPE
    proc = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, text=True, preexec_fn=preexec
    )
    up = _Up(proc, [], "", [])
    try:
        up.url = _read_until_ready(proc, up.lines)
        up.children = _children(proc.pid)
        assert len(up.children) == 3, up.children  # scheduler, one prefill and one decode worker
        yield up
    finally:
        if proc.poll() is None:
            up.children += _children(proc.pid)
            proc.kill()
            proc.wait()
        for pid in up.children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize(
    ("stop_signal", "sigint_ignored"),
    [
        pytest.param(signal.SIGTERM, False, id="sigterm"),
        # What a script without job control does to a background command: SIGINT arrives ignored.
        pytest.param(signal.SIGINT, True, id="sigint-inherited-ignored"),
        pytest.param(signal.SIGHUP, False, id="sighup"),  # its terminal was closed
    ],
)
def test_pdorch_up_serves_then_stops_every_process_on_a_signal(
    tmp_path: Path, stop_signal: signal.Signals, sigint_ignored: bool
) -> None:
    with _ready_cluster(tmp_path, sigint_ignored=sigint_ignored) as up:
        question = [{"role": "user", "content": "What is the capital of France?"}]
        body = {"model": DEFAULT_MODEL, "messages": question, "max_tokens": 16, "temperature": 0}
        answer = _post(up.url, "/v1/chat/completions", body)["choices"][0]
        assert "Paris" in answer["message"]["content"], answer
        assert answer["finish_reason"] == "stop"

        up.proc.send_signal(stop_signal)
        assert up.proc.wait(STOP_TIMEOUT_S) == 0, "".join(up.lines)
        assert not up.left_behind(10), "pdorch up left processes behind"
        assert "stopping" in "".join(up.lines)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; the kernel's parent-death signal")
def test_a_killed_pdorch_up_leaves_no_process_behind(tmp_path: Path) -> None:
    """SIGKILL (the OOM killer, kill -9) gives the launcher no chance to stop anything: the kernel
    tells its children, which shut down, instead of keeping the cluster's ports."""
    with _ready_cluster(tmp_path) as up:
        up.proc.kill()
        up.proc.wait()
        assert not up.left_behind(STOP_TIMEOUT_S), "children outlived a killed pdorch up"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _workers(url: str) -> set[str]:
    with urllib.request.urlopen(f"{url}/v1/cluster", timeout=5) as r:
        return {w["worker_id"] for w in json.load(r)["workers"]}


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_pdorch_up_restarts_a_child_that_dies(tmp_path: Path) -> None:
    """A worker killed with SIGKILL comes back (the cluster stays whole) instead of the launcher
    tearing everything down; Ctrl-C still stops everything."""
    with _ready_cluster(tmp_path) as up:
        decode = next(pid for pid in up.children if "--worker-id decode-0" in _cmdline(pid))
        os.kill(decode, signal.SIGKILL)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            fresh = [pid for pid in _children(up.proc.pid) if "--worker-id decode-0" in _cmdline(pid)]
            if fresh and fresh[0] != decode and "decode-0" in _workers(up.url):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"decode-0 was not restarted; output:\n{''.join(up.lines)}")
        up.children += fresh
        assert up.proc.poll() is None, "pdorch up stopped when a child died"
        assert "decode-0 exited with -9; restarting it" in "".join(up.lines)
        body = {"model": DEFAULT_MODEL, "prompt": "Once upon a time", "max_tokens": 4}
        assert _post(up.url, "/v1/completions", body)["usage"]["completion_tokens"] == 4
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(STOP_TIMEOUT_S) == 0, "".join(up.lines)
        assert not up.left_behind(10), "pdorch up left processes behind"
