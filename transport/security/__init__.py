"""Who may talk to whom on the ZeroMQ planes: CURVE keys, the trusted set, the ZAP handler.

``docs/operations.md`` has the threat model and how to make and rotate keys.
"""

from transport.security.config import KvPayload, SecurityConfig
from transport.security.keys import KeyKind, KeyPair, PublicKey
from transport.security.security import (
    NO_CLIENT_AUTH,
    NO_SERVER_AUTH,
    ClientAuth,
    Mechanism,
    Security,
    ServerAuth,
    peer_name,
)
from transport.security.zap import Plane

__all__ = [
    "NO_CLIENT_AUTH",
    "NO_SERVER_AUTH",
    "ClientAuth",
    "KeyKind",
    "KeyPair",
    "KvPayload",
    "Mechanism",
    "Plane",
    "PublicKey",
    "Security",
    "SecurityConfig",
    "ServerAuth",
    "peer_name",
]
