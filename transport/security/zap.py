"""The ZAP handler (ZeroMQ RFC 27): who may complete a handshake with this process's servers.

libzmq asks it, over ``inproc://zeromq.zap.01`` in the socket's context, about every connection
a CURVE or PLAIN server socket accepts, and attaches the answer's user id to every message that
connection delivers (read it with :func:`transport.security.peer_name`). Server sockets also set
``ZAP_ENFORCE_DOMAIN``, so that without this handler running every handshake fails instead of
every one succeeding.

It runs on a thread of its own, so handshakes complete whatever the event loop is doing. The
decision (:func:`decide`) is a pure function of the request and the trusted keys.
"""

from __future__ import annotations

import enum
import hmac
import logging
import threading

import msgspec
import zmq
from zmq.utils import z85

from transport.rate_limited_log import RateLimitedLog
from transport.security.keys import KeyKind
from transport.security.trusted import TrustedKeys

log = logging.getLogger("pdorch.security")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_VERSION = b"1.0"
_POLL_MS = 250


class Plane(enum.StrEnum):
    """The ZAP domain of a server socket: which plane it serves, so which keys it admits."""

    CONTROL = "pdorch-control"
    KV = "pdorch-kv"


# Who may open a connection to each plane's servers.
ADMITTED: dict[Plane, frozenset[KeyKind]] = {
    # Only workers register with the scheduler.
    Plane.CONTROL: frozenset({KeyKind.WORKER}),
    # Workers move KV; the scheduler pings the broker.
    Plane.KV: frozenset({KeyKind.WORKER, KeyKind.SCHEDULER}),
}


class Verdict(msgspec.Struct, frozen=True, gc=False):
    allowed: bool
    reason: str
    user_id: str = ""


class ZapStats(msgspec.Struct, gc=False):
    allowed: int = 0
    refused: int = 0


def decide(
    trusted: TrustedKeys, domain: str, mechanism: bytes, credentials: list[bytes], kv_password: str
) -> Verdict:
    """Admit a handshake or not, and under which name."""
    try:
        plane = Plane(domain)
    except ValueError:
        return Verdict(False, f"unknown domain {domain!r}")
    if mechanism == b"CURVE" and len(credentials) == 1 and len(credentials[0]) == 32:
        key = trusted.by_public(z85.encode(credentials[0]).decode())
        if key is None:
            return Verdict(False, "unknown key")
        if key.kind not in ADMITTED[plane]:
            return Verdict(False, f"a {key.kind} key may not connect to {plane}")
        return Verdict(True, "OK", key.name)
    if mechanism == b"PLAIN" and len(credentials) == 2 and plane is Plane.KV and kv_password:
        username = credentials[0].decode(errors="replace")
        if not hmac.compare_digest(credentials[1], kv_password.encode()):
            return Verdict(False, "wrong KV password")
        key = trusted.by_name(username)
        if key is None or key.kind not in ADMITTED[plane]:
            return Verdict(False, f"{username!r} is not a trusted name on {plane}")
        return Verdict(True, "OK", key.name)
    return Verdict(False, f"mechanism {mechanism.decode(errors='replace')} not accepted on {plane}")


class ZapHandler:
    """Answers the ZAP requests of one ZeroMQ context until :meth:`close`."""

    def __init__(self, ctx: zmq.Context, trusted: TrustedKeys, kv_password: str = "") -> None:
        self._trusted = trusted
        self._kv_password = kv_password
        self._sock = zmq.Context.shadow(ctx.underlying).socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(ZAP_ENDPOINT)  # fails if another handler already serves this context
        self._stop = threading.Event()
        self.stats = ZapStats()
        self._refusal_log = RateLimitedLog(log)
        self._thread = threading.Thread(target=self._run, name="zap-handler", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        # The thread owns the socket from here on, and closes it (else the context never ends).
        try:
            while not self._stop.is_set():
                if self._sock.poll(_POLL_MS):
                    self._answer(self._sock.recv_multipart())
        except zmq.ContextTerminated:
            pass
        except Exception:  # every handshake would hang: say so loudly
            log.exception("the ZAP handler failed; new connections will not be admitted")
        finally:
            self._sock.close(linger=0)

    def _answer(self, request: list[bytes]) -> None:
        if len(request) < 6:
            # Not from libzmq; nothing to correlate a reply with but the envelope REP keeps.
            self._sock.send_multipart([_VERSION, b"", b"400", b"malformed request", b"", b""])
            return
        version, request_id, domain, address, _identity, mechanism = request[:6]
        if version != _VERSION:
            verdict = Verdict(False, "unsupported ZAP version")
        else:
            verdict = decide(
                self._trusted, domain.decode(errors="replace"), mechanism, request[6:], self._kv_password
            )
        if verdict.allowed:
            self.stats.allowed += 1
            status = b"200"
        else:
            self.stats.refused += 1
            status = b"400"
            self._refusal_log(
                "refused a %s handshake on %s from %s: %s",
                mechanism.decode(errors="replace"),
                domain.decode(errors="replace"),
                address.decode(errors="replace"),
                verdict.reason,
            )
        self._sock.send_multipart(
            [_VERSION, request_id, status, verdict.reason.encode(), verdict.user_id.encode(), b""]
        )
