"""Whether two KV peers share a host, and the switch that forces the same-host path on or off.

A sender announces its host identity in ``KvBegin.host``; the receiver offers a ring when it
equals its own. The identity names what the path needs, not a machine's name: the same kernel
boot (``boot_id``), the same PID namespace (the sender reaches the ring through ``/proc/<pid>``
of the receiver) and the same user (the kernel lets only the owner open another process's fds).
"""

from __future__ import annotations

import enum
import functools
import os


class SameHostMode(enum.StrEnum):
    # Use shared memory when both sides report the same host identity; TCP otherwise.
    AUTO = "auto"
    # Always offer (receiver) / insist on (sender) shared memory: a transfer that cannot use it fails.
    ON = "on"
    # Never: every byte goes through the socket.
    OFF = "off"


@functools.cache
def host_identity() -> str:
    """``boot_id:pid-namespace:uid`` of this process, or "" where it cannot be known (not Linux)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        pid_ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return f"{boot}:{pid_ns}:{os.getuid()}"
