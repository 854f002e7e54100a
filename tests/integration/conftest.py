"""KV-plane fixtures on real loopback sockets, shared by the integration tests."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator

import pytest
import zmq.asyncio

from tests.support.security import INSECURE
from transport.kv import KvSender
from transport.kv.broker import KvBroker


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    # Terminating blocks while any socket of the context is still open in another thread (seen
    # intermittently after the broker-monitor tests): bounded, so one leak cannot hang the suite.
    closer = threading.Thread(target=context.destroy, kwargs={"linger": 0}, daemon=True)
    closer.start()
    closer.join(10.0)


@pytest.fixture
async def sender(ctx: zmq.asyncio.Context) -> AsyncIterator[KvSender]:
    tx = KvSender(ctx, security=INSECURE)
    yield tx
    await tx.close()


@pytest.fixture
async def rendezvous_sender(ctx: zmq.asyncio.Context) -> AsyncIterator[KvSender]:
    """Never eager: every transfer waits for its accept and for credit (the tests' small ones too)."""
    tx = KvSender(ctx, security=INSECURE, eager_max_bytes=0)
    yield tx
    await tx.close()


@pytest.fixture
async def broker(ctx: zmq.asyncio.Context) -> AsyncIterator[KvBroker]:
    kv_broker = KvBroker(
        ctx, security=INSECURE, bind="tcp://127.0.0.1:0", capacity_bytes=64 * 1024 * 1024, ttl_s=60
    )
    await kv_broker.start()
    yield kv_broker
    await kv_broker.close()
