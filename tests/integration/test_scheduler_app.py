"""The scheduler app's wiring: each resource starts in its own cleanup context and stops in reverse."""

from __future__ import annotations

import asyncio

import pytest
import zmq
import zmq.asyncio
from aiohttp import web

from scheduler.app import build_app
from scheduler.app_keys import CLUSTER, KUBERNETES, ORCHESTRATOR, TOKENIZERS, ZMQ_CONTEXT
from scheduler.config import SchedulerConfig
from transport.security import SecurityConfig

OPEN = SecurityConfig(insecure=True)


async def test_the_app_starts_its_resources_and_stops_them_all() -> None:
    app = build_app(SchedulerConfig(control_bind="tcp://127.0.0.1:0", security=OPEN))
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        assert app[ORCHESTRATOR] is not None and app[CLUSTER].workers() == []
        assert app[TOKENIZERS].get("byte") is not None
        assert app[KUBERNETES].discovery is None and app[KUBERNETES].autoscaler is None  # off by default
    finally:
        await asyncio.wait_for(runner.cleanup(), 10)
    assert app[ZMQ_CONTEXT].closed  # term() returned: the control socket was closed before it


async def test_a_control_endpoint_in_use_fails_the_start_and_stops_what_had_started() -> None:
    ctx = zmq.asyncio.Context()
    taken = ctx.socket(zmq.ROUTER)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    app = build_app(SchedulerConfig(control_bind=f"tcp://127.0.0.1:{port}", security=OPEN))
    runner = web.AppRunner(app)
    try:
        with pytest.raises(zmq.ZMQError):
            await runner.setup()
        await asyncio.wait_for(runner.cleanup(), 10)  # the ZeroMQ context terminates: nothing left open
        assert app[ZMQ_CONTEXT].closed
        assert ORCHESTRATOR not in app
    finally:
        taken.close(linger=0)
        ctx.term()
