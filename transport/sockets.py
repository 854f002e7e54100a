"""The one place where ZeroMQ socket options and addresses are set.

Every socket in pdorch is made here so that the same safety options hold everywhere:

- ``LINGER 0``: closing a socket never blocks the process on undelivered messages; every protocol
  that needs delivery confirms it with an explicit reply (ack) instead.
- ``MAXMSGSIZE``: a peer that sends a frame larger than the codec ever produces is disconnected by
  libzmq before the frame is allocated, so garbage cannot exhaust memory.
- High-water marks: bounded queues, so a peer that stops reading cannot grow our memory without
  limit. (The KV plane bounds bytes on top of this with its own credit-based flow control.)
- TCP keepalive: a peer that vanished without closing its connection (power loss, a NAT or
  conntrack entry that expired) is noticed by the kernel rather than kept forever.
- ``ROUTER_MANDATORY`` on every ROUTER: sending to a peer that is gone raises ``EHOSTUNREACH``
  instead of being dropped silently, so the caller can fail the request at once.
- Never ``ROUTER_HANDOVER``: a second connection never takes over an identity (and its traffic).
  ROUTERs name their connections themselves; what a connection may claim is decided by who it
  authenticated as.
- Authentication (``transport/security``): a server socket is a CURVE (or, for a plaintext KV
  plane, PLAIN) server in a ZAP domain, with ``ZAP_ENFORCE_DOMAIN`` so that no handshake succeeds
  unless the process's ZAP handler admits it; a client pins its server's public key.
- ``HANDSHAKE_IVL``: a connection that does not complete its handshake within 5 s is dropped, so
  idle TCP connections to a ZeroMQ port cannot pile up.
"""

from __future__ import annotations

import logging
import os
from typing import TypeVar

import zmq
import zmq.asyncio

from transport.codec import MAX_FRAME_BYTES
from transport.security import ClientAuth, Mechanism, ServerAuth

log = logging.getLogger("pdorch.sockets")

S = TypeVar("S", bound=zmq.Socket)

# Messages (not bytes) queued per peer; libzmq's own default. Large enough never to throttle a
# healthy peer, small enough to bound a stuck one.
DEFAULT_HWM = 1000
# Kernel keepalive: first probe after 30 s idle, then every 10 s, give up after 3 misses.
TCP_KEEPALIVE_IDLE_S = 30
TCP_KEEPALIVE_INTERVAL_S = 10
TCP_KEEPALIVE_COUNT = 3
# Reconnect back-off of libzmq for connecting sockets.
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 5000
HANDSHAKE_IVL_MS = 5000


def _apply_common_options(sock: zmq.Socket, hwm: int) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, TCP_KEEPALIVE_IDLE_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, TCP_KEEPALIVE_INTERVAL_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, TCP_KEEPALIVE_COUNT)
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)


def _apply_server_auth(sock: zmq.Socket, auth: ServerAuth) -> None:
    if auth.mechanism is Mechanism.NULL:
        return
    if auth.mechanism is Mechanism.CURVE:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, auth.secret_key.encode())
    else:
        sock.setsockopt(zmq.PLAIN_SERVER, 1)
    sock.setsockopt(zmq.ZAP_DOMAIN, auth.domain.encode())
    # Without a ZAP handler, libzmq would admit every handshake: make it refuse them all instead.
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def _apply_client_auth(sock: zmq.Socket, auth: ClientAuth) -> None:
    if auth.mechanism is Mechanism.CURVE:
        sock.setsockopt(zmq.CURVE_PUBLICKEY, auth.public_key.encode())
        sock.setsockopt(zmq.CURVE_SECRETKEY, auth.secret_key.encode())
        sock.setsockopt(zmq.CURVE_SERVERKEY, auth.server_key.encode())
    elif auth.mechanism is Mechanism.PLAIN:
        sock.setsockopt(zmq.PLAIN_USERNAME, auth.username.encode())
        sock.setsockopt(zmq.PLAIN_PASSWORD, auth.password.encode())


def normalize_bind(endpoint: str) -> str:
    """Accept ``:0`` as well as ``:*`` for "any free port" (libzmq's spelling is ``*``)."""
    if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        return endpoint[:-2] + ":*"
    return endpoint


def bound_endpoint(sock: zmq.Socket) -> str:
    """The address a bound socket really listens on, with the port resolved (``tcp://h:*`` -> ``tcp://h:N``)."""
    last = sock.getsockopt(zmq.LAST_ENDPOINT)
    return last.decode() if isinstance(last, bytes) else str(last)


def advertised_endpoint(bound: str, host: str) -> str:
    """``bound`` with a wildcard host (``0.0.0.0``, ``*``, ``[::]``) replaced by ``host``, for dialing."""
    prefix = "tcp://"
    if not bound.startswith(prefix):
        return bound
    hostport = bound[len(prefix) :]
    bound_host, _, port = hostport.rpartition(":")
    if bound_host in ("0.0.0.0", "*", "[::]", "::"):
        return f"{prefix}{host}:{port}"
    return bound


def new_context() -> zmq.asyncio.Context:
    """A ZeroMQ context whose threads (its I/O threads and reaper) run as batch work (see
    :func:`_batch_schedule`)."""
    before = _threads()
    ctx = zmq.asyncio.Context()
    # libzmq starts a context's threads with its first socket (they name themselves only later).
    plain_context(ctx).socket(zmq.PAIR).close(linger=0)
    # Only this context's: in a process that is not ours (vLLM's), its own threads stay as they are.
    _batch_schedule(_threads() - before)
    return ctx


def _threads() -> set[int]:
    """The ids of this process's threads (Linux; none elsewhere)."""
    try:
        return {int(tid) for tid in os.listdir("/proc/self/task")}
    except OSError:
        return set()


def _batch_schedule(tids: set[int]) -> None:
    """Put these threads under ``SCHED_BATCH``: a woken I/O thread then does not preempt the thread
    that woke it. Every send wakes the I/O thread of its socket; preempting the sender at once
    costs two context switches per message and one I/O-thread wake-up each, where waiting for the
    sender to yield lets one wake-up flush all that was queued meanwhile (``bench/overhead.py``:
    4x fewer context switches, 15-25% less CPU per request in the agents). Only wake-up
    preemption goes; the threads' share of the CPU is unchanged. Unprivileged threads may always
    choose it; where a sandbox forbids it, nothing changes."""
    if not hasattr(os, "SCHED_BATCH"):
        return
    for tid in tids:
        try:
            os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
        except OSError as e:
            log.info("cannot batch-schedule ZeroMQ thread %d: %s", tid, e)


def plain_context(ctx: zmq.Context) -> zmq.Context:
    """A blocking-API view of ``ctx`` (e.g. of a ``zmq.asyncio.Context``): same I/O threads, and
    closing it leaves ``ctx`` alone. For sockets driven by :class:`transport.loop_socket.LoopSocket`."""
    return zmq.Context.shadow(ctx.underlying)


def _bound(
    ctx: zmq.Context[S], kind: int, bind: str, auth: ServerAuth, hwm: int, options: dict[int, int]
) -> S:
    sock = ctx.socket(kind)
    try:
        _apply_common_options(sock, hwm)
        for option, value in options.items():
            sock.setsockopt(option, value)
        _apply_server_auth(sock, auth)
        sock.bind(normalize_bind(bind))
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def _connected(
    ctx: zmq.Context[S], kind: int, connect: str, auth: ClientAuth, hwm: int, options: dict[int, int | bytes]
) -> S:
    sock = ctx.socket(kind)
    try:
        _apply_common_options(sock, hwm)
        _apply_client_auth(sock, auth)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        for option, value in options.items():
            sock.setsockopt(option, value)
        if connect:
            sock.connect(connect)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def router(ctx: zmq.Context[S], bind: str, *, auth: ServerAuth, hwm: int = DEFAULT_HWM) -> S:
    """A bound ROUTER that admits the peers ``auth`` says (``NO_SERVER_AUTH``: anyone)."""
    return _bound(ctx, zmq.ROUTER, bind, auth, hwm, {zmq.ROUTER_MANDATORY: 1})


def dealer(
    ctx: zmq.Context[S],
    connect: str,
    *,
    auth: ClientAuth,
    identity: bytes | None = None,
    hwm: int = DEFAULT_HWM,
) -> S:
    """A DEALER connected to ``connect`` ("": not yet, e.g. to watch its handshakes first),
    authenticating as ``auth`` says (``NO_CLIENT_AUTH``: not at all); ``identity`` fixes its routing
    id (else the server's ROUTER names the connection)."""
    options: dict[int, int | bytes] = {} if identity is None else {zmq.IDENTITY: identity}
    return _connected(ctx, zmq.DEALER, connect, auth, hwm, options)


def pull(
    ctx: zmq.Context[S], bind: str, *, auth: ServerAuth, hwm: int = DEFAULT_HWM, max_bytes: int = 0
) -> S:
    """A bound PULL that admits the peers ``auth`` says; ``max_bytes``: a smaller message limit
    than the codec's, for a socket that only ever takes small notes (a larger one disconnects)."""
    return _bound(ctx, zmq.PULL, bind, auth, hwm, {zmq.MAXMSGSIZE: max_bytes} if max_bytes else {})


def push(ctx: zmq.Context[S], connect: str, *, auth: ClientAuth, hwm: int = DEFAULT_HWM) -> S:
    """A PUSH connected to ``connect``, authenticating as ``auth`` says."""
    return _connected(ctx, zmq.PUSH, connect, auth, hwm, {})
