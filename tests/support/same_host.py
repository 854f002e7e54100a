"""Watching shared KV rings from outside, and driving a same-host KV peer process."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from transport.kv.same_host.ring import MEMFD_NAME

REPO_ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 60.0  # bounds a wait for another process on a shared machine; success never waits for it


def rings_open(pid: int | str = "self") -> dict[int, str]:
    """The shared KV rings a process holds an fd of: inode -> one such fd (mmap keeps a dup)."""
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if os.readlink(path).startswith(f"/memfd:{MEMFD_NAME}"):
                found[os.stat(path).st_ino] = fd
        except OSError:
            continue
    return found


def scribble_over_rings() -> int:
    """Overwrite every shared ring this process maps with random bytes (through its mapping: a
    sealed ring has no fd); returns how many."""
    count = 0
    for line in rings_mapped():
        start, end = (int(a, 16) for a in line.split()[0].split("-"))
        garbage = np.random.default_rng(count).bytes(end - start)
        ctypes.memmove(start, garbage, end - start)
        count += 1
    return count


def rings_mapped(pid: int | str = "self") -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        return [line for line in f if f"memfd:{MEMFD_NAME}" in line]


def dev_shm() -> set[str]:
    """pdorch's entries in /dev/shm (other programs on the machine have theirs)."""
    return {n for n in os.listdir("/dev/shm") if "pdorch" in n} if os.path.isdir("/dev/shm") else set()


def peer(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.same_host_peer", *args],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


async def line_from(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return (await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), WAIT_S)).strip()


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(WAIT_S)
