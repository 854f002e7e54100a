"""Serving the scheduler's aiohttp app on its port, with the connection limits in front.

What ``web.run_app`` does (a runner, SIGINT/SIGTERM stop it gracefully), plus: every connection
passes :class:`ConnectionLimits` first (which also bounds how long a request's head may take); an
idle keep-alive connection is closed after ``http.idle_timeout_s`` (aiohttp's keep-alive timer);
and the process may hold as many descriptors as the limits allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal

from aiohttp import web

from scheduler.app_keys import CONNECTIONS
from scheduler.config import SchedulerConfig

log = logging.getLogger("pdorch.scheduler")

# Descriptors the process needs besides client connections: sockets to workers, files, epoll.
_SPARE_FDS = 1024


async def serve(app: web.Application, cfg: SchedulerConfig) -> None:
    """Serve until SIGINT or SIGTERM, then stop as ``web.run_app`` would (requests in flight get
    up to a minute)."""
    _allow_descriptors(cfg.http.max_connections + _SPARE_FDS)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=cfg.http.idle_timeout_s,
        # Bodies are decompressed by request_io.py, bounded, and only in codings it knows: aiohttp
        # refuses others (br, zstd) in its parser, in plain text, asking for a module to install.
        auto_decompress=False,
    )
    await runner.setup()
    server: asyncio.Server | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        assert runner.server is not None
        server = await loop.create_server(app[CONNECTIONS].wrap(runner.server), cfg.host, cfg.port)
        log.info("HTTP on %s:%d", cfg.host, cfg.port)
        await stop.wait()
    finally:
        if server is not None:
            server.close()
        await runner.cleanup()


def _allow_descriptors(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
