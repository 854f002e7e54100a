"""Every entry point's first call: the log level and format, uvloop's event loop, the collector."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import asyncio, gc, logging
from transport.process_setup import GC_YOUNG_THRESHOLD, setup_process
setup_process("debug")
assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD > 700
logging.getLogger("pdorch.test").debug("hello")
loop = asyncio.new_event_loop()
print(type(loop).__module__, logging.getLogger().level == logging.DEBUG)
"""


def test_setup_process_sets_the_level_the_format_uvloop_and_the_collector() -> None:
    out = subprocess.run([sys.executable, "-c", CHECK], check=True, capture_output=True, text=True)
    assert out.stdout.split() == ["uvloop", "True"]
    assert " DEBUG pdorch.test: hello" in out.stderr
