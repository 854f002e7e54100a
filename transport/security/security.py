"""One process's authentication: its keys, the keys it trusts, and a ZAP handler per context.

It hands :mod:`transport.sockets` a description of how each socket authenticates
(:class:`ServerAuth`, :class:`ClientAuth`); the socket options themselves are set there and only
there. Servers admit the peers :mod:`transport.security.zap` admits; clients pin the server's
public key, so they never talk to an impostor of the scheduler, a worker or the KV broker.
"""

from __future__ import annotations

import enum
import threading
from pathlib import Path

import msgspec
import zmq

from transport.errors import ErrorCode, PdorchError
from transport.security.config import KvPayload, SecurityConfig
from transport.security.keys import KeyKind, KeyPair, PublicKey, read_keypair
from transport.security.trusted import TrustedKeys
from transport.security.zap import Plane, ZapHandler


class Mechanism(enum.StrEnum):
    NULL = "null"  # no authentication
    CURVE = "curve"
    PLAIN = "plain"


class ServerAuth(msgspec.Struct, frozen=True, gc=False):
    mechanism: Mechanism
    secret_key: str = ""
    domain: str = ""


class ClientAuth(msgspec.Struct, frozen=True, gc=False, repr_omit_defaults=True):
    mechanism: Mechanism
    public_key: str = ""
    secret_key: str = ""
    server_key: str = ""
    username: str = ""
    password: str = msgspec.field(default="")

    def __repr__(self) -> str:  # never print a secret into a log
        return f"ClientAuth({self.mechanism}, server_key={self.server_key!r}, username={self.username!r})"


NO_SERVER_AUTH = ServerAuth(Mechanism.NULL)
NO_CLIENT_AUTH = ClientAuth(Mechanism.NULL)


def peer_name(frame: zmq.Frame) -> str:
    """The name the ZAP handler gave the connection a message came from ("" without authentication)."""
    try:
        return frame.get("User-Id") or ""
    except zmq.ZMQError:  # NULL mechanism: the property does not exist
        return ""


class Security:
    def __init__(self, keys: KeyPair | None, trusted: TrustedKeys | None, kv_payload: KvPayload) -> None:
        """Use :meth:`load` or :meth:`insecure`."""
        self._keys = keys
        self._trusted = trusted
        self.kv_payload = kv_payload
        self._kv_password = ""
        if trusted is not None and kv_payload is KvPayload.PLAINTEXT:
            self._kv_password = trusted.kv_password()
        self._handlers: dict[int, ZapHandler] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(cls, cfg: SecurityConfig) -> Security:
        cfg.validate()
        if cfg.insecure:
            return cls.insecure()
        keys = read_keypair(Path(cfg.key_file))
        return cls(keys, TrustedKeys(Path(cfg.trusted_keys)), cfg.kv_payload)

    @classmethod
    def insecure(cls) -> Security:
        return cls(None, None, KvPayload.PLAINTEXT)

    @property
    def enabled(self) -> bool:
        return self._keys is not None

    @property
    def name(self) -> str:
        """This process's key name ("" without authentication)."""
        return self._keys.name if self._keys is not None else ""

    @property
    def public_key(self) -> str:
        return self._keys.public if self._keys is not None else ""

    def trusted(self, name: str) -> PublicKey | None:
        """A trusted party's key by name (None without authentication, or if unknown)."""
        return self._trusted.by_name(name) if self._trusted is not None else None

    def server_key(self, kind: KeyKind) -> str:
        """The public key of the one scheduler or KV broker, to pin as a client ("" when insecure)."""
        return self._trusted.only(kind).public if self._trusted is not None else ""

    @property
    def refused_handshakes(self) -> int:
        return sum(h.stats.refused for h in list(self._handlers.values()))

    @property
    def admitted_handshakes(self) -> int:
        """Handshakes this process's servers admitted: with none, no peer ever got through."""
        return sum(h.stats.allowed for h in list(self._handlers.values()))

    # ------------------------------------------------------------------ what sockets.py applies

    def server(self, ctx: zmq.Context, plane: Plane) -> ServerAuth:
        """How a server socket of ``ctx`` on ``plane`` authenticates (starts ``ctx``'s ZAP handler)."""
        if self._keys is None:
            return NO_SERVER_AUTH
        self._serve_zap(ctx)
        if plane is Plane.KV and not self._kv_curve():
            return ServerAuth(Mechanism.PLAIN, domain=plane.value)
        return ServerAuth(Mechanism.CURVE, self._keys.secret, plane.value)

    def client(self, plane: Plane, server_key: str) -> ClientAuth:
        """How a client socket connects to a server on ``plane`` whose public key is ``server_key``."""
        keys = self._keys
        if keys is None:
            return NO_CLIENT_AUTH
        if plane is Plane.KV and not self._kv_curve():
            return ClientAuth(Mechanism.PLAIN, username=keys.name, password=self._kv_password)
        if not server_key:
            raise PdorchError(
                ErrorCode.CONFIG, f"no public key is known for the {plane} server to connect to"
            )
        return ClientAuth(Mechanism.CURVE, keys.public, keys.secret, server_key)

    def close(self) -> None:
        """Stop the ZAP handlers (before their contexts are terminated)."""
        with self._lock:
            handlers, self._handlers = list(self._handlers.values()), {}
        for handler in handlers:
            handler.close()

    def _kv_curve(self) -> bool:
        return self.kv_payload is KvPayload.ENCRYPTED

    def _serve_zap(self, ctx: zmq.Context) -> None:
        assert self._trusted is not None
        with self._lock:
            if ctx.underlying not in self._handlers:
                self._handlers[ctx.underlying] = ZapHandler(ctx, self._trusted, self._kv_password)
