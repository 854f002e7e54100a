"""The notes a decode vLLM's connector sends its agent while a request's KV arrives, on real
authenticated ZeroMQ sockets: what becomes ``KvArriving``, and what is refused or ignored."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import zmq

from transport import sockets
from transport.frames import send_frames
from transport.messages import KvArriving
from transport.security import Security, SecurityConfig
from transport.security.key_set import KeySet
from transport.security.zap import Plane
from workers.engines.vllm.kv_arrivals import EMIT_EVERY_S, NOTE_MAX_BYTES, ArrivalListener, ArrivalReporter

pytestmark = pytest.mark.timeout(60)


@dataclass
class Pair:
    listener: ArrivalListener
    reporter: ArrivalReporter
    said: list[object]
    keys: KeySet
    plain: zmq.Context
    agent: Security


def _security(keys: KeySet, name: str) -> Security:
    return Security.load(
        SecurityConfig(key_file=str(keys.key_file(name)), trusted_keys=str(keys.trusted_dir))
    )


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    """The agent's listener and the connector's reporter, both with the decode worker's key."""
    keys = KeySet.create(tmp_path / "keys", {"decode-0": (), "decode-1": ()})
    ctx = sockets.new_context()
    agent, connector = _security(keys, "decode-0"), _security(keys, "decode-0")
    listener = ArrivalListener(ctx, "tcp://127.0.0.1:0", agent)
    said: list[object] = []
    listener.start(said.append)
    plain = sockets.plain_context(ctx)
    reporter = ArrivalReporter(plain, listener.endpoint, connector)
    try:
        yield Pair(listener, reporter, said, keys, plain, agent)
    finally:
        reporter.close()
        await listener.close()
        agent.close()
        connector.close()
        ctx.destroy(linger=0)


async def _until(predicate, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def _told(p: Pair, transfer_id: str, request_id: str) -> None:
    """Note ``transfer_id`` until the listener says it arrives (the PUSH connects in the background:
    notes sent before it did are dropped, as advice may be)."""
    deadline = time.monotonic() + 10
    while KvArriving(request_id) not in p.said:
        assert time.monotonic() < deadline, "never heard"
        p.reporter.arriving(transfer_id)
        await asyncio.sleep(0.05)


async def test_a_note_for_a_job_waiting_for_its_kv_becomes_kv_arriving(pair: Pair) -> None:
    pair.listener.watch("prefill-0/t1", "req-1")
    await _told(pair, "prefill-0/t1", "req-1")
    assert pair.said == [KvArriving("req-1")]


async def test_notes_about_no_waiting_job_are_ignored(pair: Pair) -> None:
    pair.listener.watch("prefill-0/t1", "req-1")
    await _told(pair, "prefill-0/t1", "req-1")
    pair.listener.unwatch("prefill-0/t1")  # its KV landed: the first token came
    await asyncio.sleep(EMIT_EVERY_S)
    for tid in ("prefill-0/t1", "prefill-0/never-watched"):
        pair.reporter.arriving(tid)
    # A watched one noted after them shows they were read (one socket, in order).
    pair.listener.watch("prefill-0/t2", "req-2")
    await _told(pair, "prefill-0/t2", "req-2")
    assert pair.said == [KvArriving("req-1"), KvArriving("req-2")]
    assert pair.listener.watched == 1


async def test_a_flood_of_notes_is_told_at_most_twice_a_second(pair: Pair) -> None:
    pair.listener.watch("prefill-0/t1", "req-1")
    await _told(pair, "prefill-0/t1", "req-1")
    started = time.monotonic()
    for _ in range(200):
        pair.reporter.arriving("prefill-0/t1")
    await asyncio.sleep(0.2)
    elapsed = time.monotonic() - started
    assert len(pair.said) <= 2 + int(elapsed / EMIT_EVERY_S)
    await asyncio.sleep(EMIT_EVERY_S)
    await _told_again(pair, "prefill-0/t1", 2)


async def _told_again(p: Pair, transfer_id: str, times: int) -> None:
    deadline = time.monotonic() + 10
    while len(p.said) < times:
        assert time.monotonic() < deadline, "never heard again"
        p.reporter.arriving(transfer_id)
        await asyncio.sleep(0.05)


async def test_malformed_and_oversized_notes_are_dropped_and_the_listener_goes_on(pair: Pair) -> None:
    """From a peer holding the key: garbage, a note of the wrong shape, a multipart message and a
    frame over the size limit (libzmq drops that connection). Good notes still get through."""
    security = _security(pair.keys, "decode-0")
    rogue = sockets.push(
        pair.plain, pair.listener.endpoint, auth=security.client(Plane.KV, security.public_key)
    )
    try:
        bad = [
            [b"\xff\x00garbage"],
            [msgspec.msgpack.encode({"transfer_id": 7})],
            [msgspec.msgpack.encode(["prefill-0/t1"]), b"second frame"],
        ]
        for frames in bad:
            send_frames(rogue, frames)
        await _until(lambda: pair.listener.bad_notes >= 3)
        send_frames(rogue, [b"x" * (NOTE_MAX_BYTES * 4)])
    finally:
        rogue.close(linger=0)
        security.close()
    pair.listener.watch("prefill-0/t1", "req-1")
    await _told(pair, "prefill-0/t1", "req-1")


async def test_a_peer_without_a_trusted_key_is_not_heard(pair: Pair, tmp_path: Path) -> None:
    strangers = KeySet.create(tmp_path / "strangers", {"decode-0": ()})
    stranger = _security(strangers, "decode-0")
    # It even pins the listener's real key; its own key is not among the trusted ones.
    listener_key = _security(pair.keys, "decode-0")
    auth = stranger.client(Plane.KV, listener_key.public_key)
    rogue = sockets.push(pair.plain, pair.listener.endpoint, auth=auth)
    try:
        pair.listener.watch("prefill-0/t1", "req-1")
        for _ in range(20):
            with contextlib.suppress(zmq.Again):  # no connection yet: it is being refused
                send_frames(rogue, [msgspec.msgpack.encode(["prefill-0/t1"])], zmq.NOBLOCK)
            await asyncio.sleep(0.05)
        await _until(lambda: pair.agent.refused_handshakes >= 1)
        assert pair.said == []
        await _told(pair, "prefill-0/t1", "req-1")  # the trusted one still is
    finally:
        rogue.close(linger=0)
        stranger.close()
        listener_key.close()
