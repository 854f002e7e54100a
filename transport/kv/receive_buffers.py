"""Keep freed receive buffers in the process instead of handing them back to the kernel.

libzmq's I/O thread allocates a fresh buffer for every frame it receives (a 1 MiB chunk: 1 MiB),
and the frame is freed once its rows are in the sink. glibc returns freed memory at the top of a
heap to the kernel once more than its trim threshold (by default, adaptively, about twice the
largest recently freed block) lies free there. A receiver holding a window of chunks
frees more than that at once, so the next chunks land in fresh pages: a page fault and a kernel
page clear per 4 KiB, which measured here as much CPU as the kernel's copy of the bytes (the I/O
thread's time doubled). Fixing both thresholds keeps frames up to 32 MiB on the heap and lets up
to :data:`TRIM_THRESHOLD_BYTES` of free memory stay for the next transfer: twice the default
window, so a whole window's frames are reused, while a process with many malloc arenas (e.g. a
vLLM worker's threads) keeps at most that much unreturned per arena.

A process-wide setting, made by the components that receive KV (decode agents' receivers, the
broker) when they start; a no-op where the C library has no ``mallopt`` (not glibc).
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's largest allowed mmap threshold on 64-bit (HEAP_MAX_SIZE / 2); every KV frame is below it.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 64 * 1024 * 1024

_done = False


def keep_receive_buffers() -> bool:
    """Apply the allocator settings once per process; True if they are in effect."""
    global _done
    if _done:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    if not ok:
        log.debug("mallopt refused the receive-buffer settings")
    _done = ok
    return ok
