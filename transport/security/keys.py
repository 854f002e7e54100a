"""CURVE key files: a party's keypair (secret) and the public keys every party trusts.

A key file is plain text, one ``field = value`` per line, ``#`` starting a comment line::

    # pdorch CURVE key (secret: readable by its owner only)
    name = decode-0
    kind = worker
    claims = decode-0
    public = <40 characters, Z85>
    secret = <40 characters, Z85>

``<name>.key`` holds all of it and is the party's own; ``<name>.pub`` is the same without
``secret`` and goes into the trusted directory of every party that must recognise it. ``kind``
says what the key may do (``scheduler``, ``kv-broker`` or ``worker``); a worker key's ``claims``
are the worker ids (glob patterns, comma-separated) it may register under: its own name for a key
per worker, ``pdorch-decode-*`` for a key a whole Kubernetes pool shares.
"""

from __future__ import annotations

import enum
import fnmatch
import os
import re
from pathlib import Path

import msgspec
import zmq

from transport.errors import ErrorCode, PdorchError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_Z85_KEY_CHARS = 40
SECRET_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"


class KeyKind(enum.StrEnum):
    SCHEDULER = "scheduler"
    KV_BROKER = "kv-broker"
    WORKER = "worker"


class PublicKey(msgspec.Struct, frozen=True, gc=False):
    """A party as the others know it."""

    name: str
    kind: KeyKind
    public: str  # Z85
    claims: tuple[str, ...] = ()

    def may_claim(self, worker_id: str) -> bool:
        """May this key register a worker under ``worker_id``?"""
        return self.kind is KeyKind.WORKER and any(fnmatch.fnmatchcase(worker_id, p) for p in self.claims)


class KeyPair(msgspec.Struct, frozen=True, gc=False):
    """A party's own keys."""

    identity: PublicKey
    secret: str  # Z85

    @property
    def name(self) -> str:
        return self.identity.name

    @property
    def public(self) -> str:
        return self.identity.public


def generate(name: str, kind: KeyKind, claims: tuple[str, ...] = ()) -> KeyPair:
    """A new keypair (libzmq's CURVE key generation, from the OS's random source)."""
    _check_name(name, "key name")
    if kind is KeyKind.WORKER and not claims:
        claims = (name,)
    public, secret = zmq.curve_keypair()
    return KeyPair(PublicKey(name, kind, public.decode(), tuple(claims)), secret.decode())


def write_keypair(keys: KeyPair, directory: Path) -> tuple[Path, Path]:
    """Write ``<name>.key`` (mode 0600) and ``<name>.pub`` into ``directory``; returns both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    secret_path = directory / f"{keys.name}{SECRET_SUFFIX}"
    public_path = directory / f"{keys.name}{PUBLIC_SUFFIX}"
    # Created with its final mode: the secret is never readable by others, not even briefly.
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(_render(keys.identity, keys.secret))
    public_path.write_text(_render(keys.identity, ""))
    return secret_path, public_path


def write_public(key: PublicKey, path: Path) -> None:
    path.write_text(_render(key, ""))


def read_keypair(path: Path) -> KeyPair:
    """A party's own keys from its ``.key`` file. CONFIG errors name the file and what is wrong."""
    fields = _read_fields(path)
    identity = _public_from(fields, path)
    secret = fields.get("secret", "")
    _check_key(secret, f"{path}: 'secret'")
    try:
        derived = zmq.curve_public(secret.encode()).decode()
    except (ValueError, zmq.ZMQError):
        raise PdorchError(ErrorCode.CONFIG, f"{path}: 'secret' is not a CURVE secret key") from None
    if derived != identity.public:
        raise PdorchError(ErrorCode.CONFIG, f"{path}: 'public' does not belong to 'secret'")
    _check_private(path)
    return KeyPair(identity, secret)


def read_public(path: Path) -> PublicKey:
    return _public_from(_read_fields(path), path)


def _check_private(path: Path) -> None:
    """As ssh does: a secret key file of one's own must not be open to others. A file someone else
    owns (a Kubernetes Secret volume: root-owned, group-readable by the pod's fsGroup) is that
    owner's to protect."""
    if os.name != "posix":
        return
    st = path.stat()
    if st.st_uid == os.getuid() and st.st_mode & 0o077:
        raise PdorchError(
            ErrorCode.CONFIG, f"{path} is open to other users (chmod 600 it): it holds a secret key"
        )


def _render(key: PublicKey, secret: str) -> str:
    lines = [
        "# pdorch CURVE key" + (" (secret: readable by its owner only)" if secret else " (public)"),
        f"name = {key.name}",
        f"kind = {key.kind}",
    ]
    if key.claims:
        lines.append(f"claims = {', '.join(key.claims)}")
    lines.append(f"public = {key.public}")
    if secret:
        lines.append(f"secret = {secret}")
    return "\n".join(lines) + "\n"


def _read_fields(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise PdorchError(ErrorCode.CONFIG, f"cannot read key file {path}: {e}") from None
    fields: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        # Z85 keys may contain '=' and '#': split at the first '=' only, never strip comments.
        field, sep, value = line.partition("=")
        if not sep:
            raise PdorchError(ErrorCode.CONFIG, f"{path}, line {number}: expected 'field = value'")
        fields[field.strip()] = value.strip()
    return fields


def _public_from(fields: dict[str, str], path: Path) -> PublicKey:
    name = fields.get("name", "")
    _check_name(name, f"{path}: 'name'")
    try:
        kind = KeyKind(fields.get("kind", ""))
    except ValueError:
        kinds = ", ".join(k.value for k in KeyKind)
        raise PdorchError(ErrorCode.CONFIG, f"{path}: 'kind' must be one of {kinds}") from None
    public = fields.get("public", "")
    _check_key(public, f"{path}: 'public'")
    claims = tuple(c.strip() for c in fields.get("claims", "").split(",") if c.strip())
    if kind is KeyKind.WORKER and not claims:
        claims = (name,)
    return PublicKey(name, kind, public, claims)


def _check_name(name: str, what: str) -> None:
    if not _NAME.fullmatch(name):
        raise PdorchError(ErrorCode.CONFIG, f"{what} {name!r} must be 1-64 of A-Z a-z 0-9 . _ -")


def _check_key(value: str, what: str) -> None:
    if len(value) != _Z85_KEY_CHARS:
        raise PdorchError(ErrorCode.CONFIG, f"{what} must be a {_Z85_KEY_CHARS}-character Z85 key")
