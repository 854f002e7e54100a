"""The keys of a whole cluster in one directory, as ``pdorch keys generate`` and ``pdorch up`` make them::

    DIR/<name>.key        one per party (secret, mode 0600): what PDORCH_KEY_FILE points at
    DIR/trusted/<name>.pub   every party's public key: what PDORCH_TRUSTED_KEYS points at
    DIR/trusted/kv.password  the KV plane's password, used only with kv_payload: plaintext

On Kubernetes each ``.key`` becomes the Secret of the pods that are that party, and ``trusted/``
one Secret every pod mounts (docs/kubernetes.md).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from transport.security.config import ENV
from transport.security.keys import (
    PUBLIC_SUFFIX,
    SECRET_SUFFIX,
    KeyKind,
    KeyPair,
    generate,
    read_public,
    write_keypair,
)
from transport.security.trusted import KV_PASSWORD_FILE

SCHEDULER = "scheduler"
KV_BROKER = "kv-broker"


class KeySet:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.trusted_dir = directory / "trusted"

    @classmethod
    def create(cls, directory: Path, workers: dict[str, tuple[str, ...]]) -> KeySet:
        """A new set: the scheduler's, the KV broker's, and one key per entry of ``workers``
        (name -> the worker ids it may claim; empty: its own name), plus a KV password."""
        keys = cls(directory)
        keys.trusted_dir.mkdir(parents=True, exist_ok=True)
        keys.add(SCHEDULER, KeyKind.SCHEDULER)
        keys.add(KV_BROKER, KeyKind.KV_BROKER)
        for name, claims in workers.items():
            keys.add(name, KeyKind.WORKER, claims)
        fd = os.open(keys.trusted_dir / KV_PASSWORD_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        return keys

    def add(self, name: str, kind: KeyKind, claims: tuple[str, ...] = ()) -> KeyPair:
        """A new party: its key file, and its public key among the trusted ones (admitted within a
        second by every running process)."""
        keys = generate(name, kind, claims)
        _, public = write_keypair(keys, self.directory)
        public.replace(self.trusted_dir / public.name)
        return keys

    def revoke(self, name: str) -> None:
        """Remove a party's public key from the trusted set: its new connections are refused, and
        the scheduler drops its workers."""
        (self.trusted_dir / f"{name}{PUBLIC_SUFFIX}").unlink(missing_ok=True)

    def public_key(self, name: str) -> str:
        """Party ``name``'s public key (Z85), as its clients pin it."""
        return read_public(self.trusted_dir / f"{name}{PUBLIC_SUFFIX}").public

    def key_file(self, name: str) -> Path:
        return self.directory / f"{name}{SECRET_SUFFIX}"

    def env(self, name: str) -> dict[str, str]:
        """The environment that makes a pdorch process party ``name``."""
        return {ENV["key_file"]: str(self.key_file(name)), ENV["trusted_keys"]: str(self.trusted_dir)}
