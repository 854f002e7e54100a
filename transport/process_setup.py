"""What every pdorch process does first: one log format on stderr, and uvloop's event loop.

It lives in ``transport``, the package every entry point (scheduler, worker, KV broker) may import.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_process(log_level: str) -> None:
    """Log at ``log_level`` (a name such as ``INFO``, any case) and make new event loops uvloop's
    when it is installed (``asyncio.run`` and aiohttp's ``run_app`` then use it)."""
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
