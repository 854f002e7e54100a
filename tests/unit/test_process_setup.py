"""Every entry point's first call: the log level and format, and uvloop's event loop."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import asyncio, logging
from transport.process_setup import setup_process
setup_process("debug")
logging.getLogger("pdorch.test").debug("hello")
loop = asyncio.new_event_loop()
print(type(loop).__module__, logging.getLogger().level == logging.DEBUG)
"""


def test_setup_process_sets_the_level_the_format_and_uvloop() -> None:
    out = subprocess.run([sys.executable, "-c", CHECK], check=True, capture_output=True, text=True)
    assert out.stdout.split() == ["uvloop", "True"]
    assert " DEBUG pdorch.test: hello" in out.stderr
