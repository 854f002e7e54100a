"""The vLLM container's preStop hook: keep vLLM up while the pdorch agent beside it drains.

The hook's script is taken from the rendered vllm-gpu overlay and run here against a fake
``/proc`` (a directory of ``<pid>/cmdline`` files), so it sees exactly the processes the test
says exist and nothing of this machine's.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.manifests.targets import container, leader_template, one, rendered

AGENT = [b"/usr/local/bin/python3.11", b"/usr/local/bin/pdorch", b"worker", b"--role", b"decode"]
AGENT_AS_MODULE = [b"python3", b"-m", b"pdorch", b"worker"]
VLLM = [b"python3", b"-m", b"vllm.entrypoints.openai.api_server", b"--port", b"8000"]
SCHEDULER = [b"/usr/local/bin/python3.11", b"/usr/local/bin/pdorch", b"scheduler"]


def hook_script(lws: str) -> str:
    lws_obj = one(list(rendered("overlays/vllm-gpu")), "LeaderWorkerSet", lws)
    command = container(leader_template(lws_obj), "vllm")["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["python3", "-c"]
    return command[2]


def fake_proc(root: Path, processes: dict[int, list[bytes]]) -> Path:
    for pid, argv in processes.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "cmdline").write_bytes(b"\0".join(argv) + b"\0")
    (root / "self").mkdir(exist_ok=True)  # non-numeric entries are ignored
    return root


def start(script: str, proc_root: Path, deadline_s: int | None = None) -> subprocess.Popen[bytes]:
    assert script.count('"/proc') == 2  # the listing and the per-process cmdline
    script = script.replace('"/proc"', repr(str(proc_root))).replace('f"/proc/', f'f"{proc_root}/')
    if deadline_s is not None:
        script = script.replace("time.monotonic() + 270", f"time.monotonic() + {deadline_s}")
    return subprocess.Popen([sys.executable, "-c", script])


def wait_exit(process: subprocess.Popen[bytes], timeout_s: float = 30) -> int:
    try:
        return process.wait(timeout=timeout_s)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("lws", ["pdorch-prefill", "pdorch-decode"])
def test_returns_at_once_without_an_agent(tmp_path: Path, lws: str) -> None:
    root = fake_proc(tmp_path / "proc", {1: [b"/pause"], 7: VLLM, 9: SCHEDULER})
    assert wait_exit(start(hook_script(lws), root)) == 0


@pytest.mark.parametrize("agent", [AGENT, AGENT_AS_MODULE], ids=["console-script", "module"])
def test_waits_while_the_agent_runs_then_returns(tmp_path: Path, agent: list[bytes]) -> None:
    root = fake_proc(tmp_path / "proc", {1: [b"/pause"], 7: VLLM, 12: agent})
    hook = start(hook_script("pdorch-decode"), root)
    try:
        # The agent is still draining: the hook must not return (its own bound is 270 s).
        for _ in range(20):
            assert hook.poll() is None, "preStop returned while the agent was still running"
            time.sleep(0.1)
        (root / "12" / "cmdline").unlink()
        (root / "12").rmdir()  # the agent exited
        assert wait_exit(hook) == 0
    finally:
        if hook.poll() is None:
            hook.kill()
            hook.wait()


def test_gives_up_at_its_deadline(tmp_path: Path) -> None:
    root = fake_proc(tmp_path / "proc", {12: AGENT})
    assert wait_exit(start(hook_script("pdorch-prefill"), root, deadline_s=1)) == 0
