"""The receive-buffer allocator settings, observed through glibc's own accounting in a fresh process."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import ctypes, json, sys
from transport.kv.receive_buffers import keep_receive_buffers
FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
applied = keep_receive_buffers() if sys.argv[1] == "tuned" else False
before = libc.mallinfo2().hblks
frame = libc.malloc(8 << 20)  # one received 8 MiB frame
mmapped = libc.mallinfo2().hblks - before
libc.free(frame)
print(json.dumps({"applied": applied, "mmapped": mmapped, "kept_free": libc.mallinfo2().keepcost}))
"""


def probe(mode: str) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc >= 2.33 (mallinfo2)")
def test_freed_frames_stay_on_the_heap_for_the_next_transfer() -> None:
    default, tuned = probe("default"), probe("tuned")
    # By default an 8 MiB frame is its own mapping, unmapped on free: the next one faults in fresh pages.
    assert default["mmapped"] == 1 and default["kept_free"] < 8 << 20
    # Tuned, it comes from the heap, and freeing it keeps its pages for the next frame.
    assert tuned["applied"] is True
    assert tuned["mmapped"] == 0 and tuned["kept_free"] >= 8 << 20
