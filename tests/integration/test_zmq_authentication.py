"""CURVE and PLAIN handshakes on real sockets: who gets a message through, and under which name.

Every refused case would get through without authentication (the same sockets, NULL mechanism).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.asyncio

from tests.support.kv import make_layers, send_all
from transport.errors import ErrorCode, PdorchError
from transport.kv import ArraySink, KvReceiver, KvSender
from transport.messages import KvMode, KvRoute
from transport.security import (
    NO_CLIENT_AUTH,
    ClientAuth,
    KeyKind,
    KvPayload,
    Mechanism,
    Plane,
    Security,
    SecurityConfig,
    ServerAuth,
    peer_name,
)
from transport.security.key_set import SCHEDULER, KeySet
from transport.security.keys import write_public
from transport.sockets import bound_endpoint, dealer, router

QUIET_S = 0.7  # long enough for a handshake on loopback, several times over


@pytest.fixture
def keys(tmp_path: Path) -> KeySet:
    return KeySet.create(tmp_path / "cluster", {"w": (), "other": ()})


def load(keys: KeySet, name: str, kv_payload: KvPayload = KvPayload.ENCRYPTED) -> Security:
    cfg = SecurityConfig(
        key_file=str(keys.key_file(name)), trusted_keys=str(keys.trusted_dir), kv_payload=kv_payload
    )
    return Security.load(cfg)


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


class Server:
    def __init__(self, ctx: zmq.Context, security: Security, plane: Plane) -> None:
        self.security = security
        self.sock = router(ctx, "tcp://127.0.0.1:0", auth=security.server(ctx, plane))
        self.endpoint = bound_endpoint(self.sock)

    def receive(self) -> tuple[bytes, str] | None:
        """(body, the sender's authenticated name) of the next message, or None if none comes."""
        if not self.sock.poll(int(QUIET_S * 1000)):
            return None
        frames = self.sock.recv_multipart(copy=False)
        return frames[1].bytes, peer_name(frames[1])

    def close(self) -> None:
        self.sock.close(linger=0)
        self.security.close()


@pytest.fixture
def control(ctx: zmq.Context, keys: KeySet) -> Iterator[Server]:
    server = Server(ctx, load(keys, SCHEDULER), Plane.CONTROL)
    yield server
    server.close()


def send_from(ctx: zmq.Context, endpoint: str, auth: ClientAuth, body: bytes = b"hello") -> zmq.Socket:
    sock = dealer(ctx, endpoint, auth=auth)
    sock.send(body)
    return sock


def test_a_trusted_key_gets_through_under_its_name(ctx: zmq.Context, keys: KeySet, control: Server) -> None:
    worker = load(keys, "w")
    client = send_from(
        ctx, control.endpoint, worker.client(Plane.CONTROL, worker.server_key(KeyKind.SCHEDULER))
    )
    assert control.receive() == (b"hello", "w")
    assert (control.security.admitted_handshakes, control.security.refused_handshakes) == (1, 0)
    client.close(linger=0)


def test_no_key_gets_nothing_through(ctx: zmq.Context, control: Server) -> None:
    client = send_from(ctx, control.endpoint, NO_CLIENT_AUTH)
    assert control.receive() is None
    client.close(linger=0)


def test_an_unknown_key_gets_nothing_through(
    ctx: zmq.Context, keys: KeySet, control: Server, tmp_path: Path
) -> None:
    stranger = load(KeySet.create(tmp_path / "elsewhere", {"w": ()}), "w")  # same name, other key
    server_key = load(keys, "w").server_key(KeyKind.SCHEDULER)
    client = send_from(ctx, control.endpoint, stranger.client(Plane.CONTROL, server_key))
    assert control.receive() is None
    assert control.security.refused_handshakes == 1
    assert control.security.admitted_handshakes == 0
    client.close(linger=0)


def test_a_key_of_another_kind_gets_nothing_through(ctx: zmq.Context, keys: KeySet, control: Server) -> None:
    broker = load(keys, "kv-broker")
    client = send_from(
        ctx, control.endpoint, broker.client(Plane.CONTROL, broker.server_key(KeyKind.SCHEDULER))
    )
    assert control.receive() is None
    client.close(linger=0)


def test_a_client_never_talks_to_a_server_with_another_key(ctx: zmq.Context, keys: KeySet) -> None:
    """An impostor of the scheduler (any key but the pinned one) gets nothing from a worker."""
    impostor = Server(ctx, load(keys, "kv-broker"), Plane.KV)  # a trusted party, but not the scheduler
    worker = load(keys, "w")
    client = send_from(ctx, impostor.endpoint, worker.client(Plane.KV, worker.server_key(KeyKind.SCHEDULER)))
    try:
        assert impostor.receive() is None
    finally:
        client.close(linger=0)
        impostor.close()


def test_a_revoked_key_gets_nothing_through_any_more(ctx: zmq.Context, keys: KeySet, control: Server) -> None:
    worker = load(keys, "w")
    auth = worker.client(Plane.CONTROL, worker.server_key(KeyKind.SCHEDULER))
    first = send_from(ctx, control.endpoint, auth)
    assert control.receive() == (b"hello", "w")
    keys.revoke("w")
    time.sleep(1.1)  # the trusted set is read again at least every second
    second = send_from(ctx, control.endpoint, auth)
    assert control.receive() is None
    first.close(linger=0)
    second.close(linger=0)


def test_without_its_zap_handler_a_server_admits_nobody(ctx: zmq.Context, keys: KeySet) -> None:
    """Fail closed: a CURVE server whose process runs no ZAP handler refuses every handshake
    (libzmq's default would be to admit any client that knows the server key)."""
    scheduler_keys = load(keys, SCHEDULER)
    secret = keys.key_file(SCHEDULER).read_text().split("secret = ")[1].strip()
    sock = router(ctx, "tcp://127.0.0.1:0", auth=ServerAuth(Mechanism.CURVE, secret, Plane.CONTROL.value))
    worker = load(keys, "w")
    client = send_from(
        ctx, bound_endpoint(sock), worker.client(Plane.CONTROL, worker.server_key(KeyKind.SCHEDULER))
    )
    try:
        assert not sock.poll(int(QUIET_S * 1000))
    finally:
        client.close(linger=0)
        sock.close(linger=0)
        scheduler_keys.close()


@pytest.mark.parametrize("right_password", [True, False])
def test_a_plaintext_kv_plane_admits_the_kv_password_only(
    ctx: zmq.Context, keys: KeySet, right_password: bool
) -> None:
    server = Server(ctx, load(keys, "other", KvPayload.PLAINTEXT), Plane.KV)
    worker = load(keys, "w", KvPayload.PLAINTEXT)
    auth = worker.client(Plane.KV, "")
    assert auth.mechanism is Mechanism.PLAIN
    if not right_password:
        auth = ClientAuth(Mechanism.PLAIN, username="w", password="x" * 43)
    client = send_from(ctx, server.endpoint, auth)
    try:
        assert server.receive() == ((b"hello", "w") if right_password else None)
    finally:
        client.close(linger=0)
        server.close()


# ---------------------------------------------------------------------------- the KV plane's links


@pytest.fixture
async def actx() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


async def test_a_refused_kv_connection_fails_its_transfers_at_once_then_recovers(
    actx: zmq.asyncio.Context, keys: KeySet
) -> None:
    """A decode worker that does not trust the sender yet: the transfer fails at once, saying why,
    not at its deadline; once the key is trusted, the next transfer gets through on a new link."""
    late = keys.add("late", KeyKind.WORKER)
    keys.revoke("late")
    decode = load(keys, "w")
    receiver = KvReceiver(actx, bind="tcp://127.0.0.1:0", security=decode)
    await receiver.start()
    sender_keys = Security.load(
        SecurityConfig(key_file=str(keys.key_file(late.name)), trusted_keys=str(keys.trusted_dir))
    )
    sender = KvSender(actx, security=sender_keys)
    route = KvRoute(KvMode.P2P, receiver.endpoint, "late/one", decode.public_key)
    layers = make_layers(2, 16, (4,), "float16")
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(PdorchError) as refused:
            await send_all(sender, route, layers, {}, deadline_s=30)
        assert refused.value.code is ErrorCode.KV_REJECTED and "refused our key" in refused.value.message
        assert loop.time() - started < 5
        write_public(late.identity, keys.trusted_dir / "late.pub")
        sink = ArraySink(2, 16, (4,), "float16")
        receiving = asyncio.create_task(
            receiver.receive(KvRoute(KvMode.P2P, "", "late/two"), sink, deadline_s=30)
        )
        await send_all(
            sender, KvRoute(KvMode.P2P, receiver.endpoint, "late/two", decode.public_key), layers, {}, 30
        )
        await receiving
        assert np.array_equal(sink.layers, layers)
    finally:
        await sender.close()
        await receiver.close()
        sender_keys.close()
        decode.close()


async def test_a_sender_may_begin_transfers_in_its_own_scope_only(
    actx: zmq.asyncio.Context, keys: KeySet
) -> None:
    decode = load(keys, "w")
    receiver = KvReceiver(actx, bind="tcp://127.0.0.1:0", security=decode)
    await receiver.start()
    other = load(keys, "other")
    sender = KvSender(actx, security=other)
    try:
        with pytest.raises(PdorchError) as e:
            route = KvRoute(KvMode.P2P, receiver.endpoint, "w/not-mine", decode.public_key)
            await send_all(sender, route, make_layers(1, 4, (4,), "float16"), {}, deadline_s=10)
        assert e.value.code is ErrorCode.KV_REJECTED and "scope" in e.value.message
    finally:
        await sender.close()
        await receiver.close()
        other.close()
        decode.close()
