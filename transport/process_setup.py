"""What every pdorch process does first: one log format on stderr, uvloop's event loop, and a
cyclic garbage collector that runs less often.

It lives in ``transport``, the package every entry point (scheduler, worker, KV broker) may import.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Allocations between young-generation collections (CPython's default: 700). Every request makes
# thousands of short-lived objects, nearly all freed by reference counting; at the default the
# scheduler ran a collection every 8-15 requests (~4% of its CPU), pausing whatever was in flight.
# Cyclic garbage waits a little longer; nothing else changes. Measured (benchmarks.md, "The request
# hot path"): p99 at 32 clients lower in 5 of 6 paired runs, CPU per request within the noise.
GC_YOUNG_THRESHOLD = 20_000


def setup_process(log_level: str) -> None:
    """Log at ``log_level`` (a name such as ``INFO``, any case), make new event loops uvloop's
    when it is installed (``asyncio.run`` and aiohttp's ``run_app`` then use it), and collect
    cyclic garbage less often (:data:`GC_YOUNG_THRESHOLD`)."""
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
