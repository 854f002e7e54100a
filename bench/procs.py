"""Processes a bench starts, and stops again by PID: each with its descendants, nothing else."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat's fields after the command name: state, ppid, ... ([] if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return []


def descendants(pid: int) -> list[tuple[int, str]]:
    """Every live process below ``pid`` as (PID, start time), children before grandchildren: the
    start time tells a reused PID from the process that had it."""
    parents: dict[int, list[tuple[int, str]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and len(fields := _stat(int(entry))) > 19:
            parents.setdefault(int(fields[1]), []).append((int(entry), fields[19]))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(0), [])
        found += kids
        todo += [kid for kid, _ in kids]
    return found


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) spent so far by ``pid`` and every live process below it."""
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid, *(p for p, _ in descendants(pid))]
    return sum(int(f[11]) + int(f[12]) for f in map(_stat, pids) if len(f) > 12) / tick


def spawn(
    argv: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with its output in ``log``, in a session of its own: a Ctrl-C in the terminal
    reaches only the bench, which then stops what it started in order."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace_s: float = 30.0) -> None:
    """Ask ``proc`` to stop with ``sig``; whatever of it and its descendants is left after
    ``grace_s`` is killed, each by its PID."""
    if proc.poll() is not None:
        return
    family = descendants(proc.pid)  # read before it stops: orphans would lose their parent link
    proc.send_signal(sig)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    deadline = time.monotonic() + 5
    for pid, started in family:
        while _alive(pid, started) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid, started):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int, started: str) -> bool:
    fields = _stat(pid)
    return len(fields) > 19 and fields[19] == started and fields[0] != "Z"
