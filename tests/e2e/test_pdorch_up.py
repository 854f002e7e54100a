"""`pdorch up`, the command behind `make run`: ready banner, a working URL, and a clean stop on a signal."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from pdorch.launcher import free_port

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
    command = [sys.executable, "-m", "pdorch", "up", "--port", str(free_port())]
    command += ["--control-port", str(free_port()), "--log-dir", str(tmp_path), "--log-level", "WARNING"]

    def preexec() -> None:
        if sigint_ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    out = subprocess.PIPE
    proc = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, text=True, preexec_fn=preexec
    )
    lines: list[str] = []
    children: list[int] = []
    try:
        url = _read_until_ready(proc, lines)
        children = _children(proc.pid)
        assert len(children) == 3, children  # scheduler, one prefill and one decode worker
        body = json.dumps({"model": "pdorch-reference", "prompt": "Hello", "max_tokens": 4}).encode()
        request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
            assert json.load(response)["usage"]["completion_tokens"] == 4

        proc.send_signal(stop_signal)
        assert proc.wait(STOP_TIMEOUT_S) == 0, "".join(lines)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in children if _alive(pid)], "pdorch up left processes behind"
        assert "stopping" in "".join(lines)
    finally:  # whatever failed, leave nothing running
        if proc.poll() is None:
            children += _children(proc.pid)
            proc.kill()
            proc.wait()
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; the kernel's parent-death signal")
def test_a_killed_pdorch_up_leaves_no_process_behind(tmp_path: Path) -> None:
    """SIGKILL (the OOM killer, kill -9) gives the launcher no chance to stop anything: the kernel
    tells its children, which shut down, instead of keeping the cluster's ports."""
    command = [sys.executable, "-m", "pdorch", "up", "--port", str(free_port())]
    command += ["--control-port", str(free_port()), "--log-dir", str(tmp_path), "--log-level", "WARNING"]
    proc = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    children: list[int] = []
    try:
        _read_until_ready(proc, lines)
        children = _children(proc.pid)
        assert len(children) == 3, children
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in children if _alive(pid)], "children outlived a killed pdorch up"
    finally:
        if proc.poll() is None:
            children += _children(proc.pid)
            proc.kill()
            proc.wait()
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
