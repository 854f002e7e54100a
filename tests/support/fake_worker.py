"""A worker speaking the control protocol by hand, for tests that need a worker to misbehave.

It authenticates as a worker of the cluster it joins (a key of its own, claiming its worker id),
unless the test gives it other keys (``security``) or a routing id of its choosing (``identity``).
"""

from __future__ import annotations

import time
from typing import Any

import zmq

from pdorch.launcher import LocalCluster
from tests.support.security import party
from transport import sockets
from transport.codec import Decoder, Encoder
from transport.messages import PROTOCOL_VERSION, FromWorker, Heartbeat, Hello, Load, Role, ToWorker
from transport.security import KeyKind, Plane, Security


class FakeWorker:
    def __init__(
        self,
        cluster: LocalCluster,
        worker_id: str,
        role: Role = Role.DECODE,
        *,
        security: Security | None = None,
        server_key: str | None = None,
        identity: bytes | None = None,
        endpoint: str | None = None,
        **hello: Any,
    ) -> None:
        """``server_key``: the scheduler key to pin (default: the cluster's real one); ``endpoint``:
        where to connect instead of the scheduler's control port (e.g. a proxy in front of it)."""
        self.security = security if security is not None else party(cluster, worker_id)
        if server_key is None:
            server_key = self.security.server_key(KeyKind.SCHEDULER)
        self.ctx = zmq.Context.instance()
        auth = self.security.client(Plane.CONTROL, server_key)
        self.sock = sockets.dealer(self.ctx, endpoint or cluster.control, auth=auth, identity=identity)
        # A connection whose handshake never completes takes nothing: sending gives up then.
        self.sock.setsockopt(zmq.SNDTIMEO, 3000)
        self.worker_id = worker_id
        fields: dict[str, Any] = {
            "protocol_version": PROTOCOL_VERSION,
            "worker_id": worker_id,
            "role": role,
            "engine": "reference",
            "model": "pdorch-reference",
            "kv_bytes_per_token": 4096,
            "block_size": 16,
            "capacity_blocks": 4096,
            "kv_endpoint": "tcp://127.0.0.1:9",
            "max_model_len": 2048,
            "vocab_size": 260,
            "eos_token_id": 257,
        }
        fields.update(hello)
        self.hello = Hello(**fields)
        self.load = Load(blocks_total=self.hello.capacity_blocks)
        self.enc = Encoder()
        self.dec: Decoder[ToWorker] = Decoder(ToWorker)

    def send(self, msg: FromWorker) -> None:
        try:
            self.sock.send_multipart(self.enc.encode(msg))
        except zmq.Again:
            raise TimeoutError("not connected to the scheduler") from None

    def recv(self, timeout_s: float = 5.0) -> ToWorker:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if self.sock.poll(int(left * 1000) + 1):
                return self.dec.decode(self.sock.recv_multipart())
        raise TimeoutError("nothing from the scheduler")

    def recv_until(self, kind: type, timeout_s: float = 10.0) -> Any:
        """Skip heartbeats and other messages until one of ``kind`` arrives."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = self.recv(deadline - time.monotonic())
            if isinstance(msg, kind):
                return msg
            if isinstance(msg, Heartbeat):
                self.send(Heartbeat(self.load))
        raise TimeoutError(f"no {kind.__name__}")

    def register(self) -> Any:
        self.send(self.hello)
        reply = self.recv()
        self.send(Heartbeat(self.load))
        return reply

    def report(self, load: Load) -> None:
        self.load = load
        self.send(Heartbeat(load))

    def close(self) -> None:
        self.sock.close(linger=0)
