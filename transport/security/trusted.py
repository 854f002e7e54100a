"""The public keys a party trusts: every ``*.pub`` file of one directory, re-read when it changes.

Adding a key file admits that party at once (an unknown key makes the directory be looked at
again: a few stat calls, less than the handshake that asked costs); deleting one refuses its new
connections within about a second (``RECHECK_S``) (key rotation, revocation: see
docs/operations.md). A Kubernetes Secret mounted as a
volume is such a directory, and the kubelet's atomic updates of it are picked up the same way. A
file that does not parse is skipped and logged, the others still apply: a revocation must not wait
for an unrelated typo to be fixed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from transport.errors import ErrorCode, PdorchError
from transport.security.keys import PUBLIC_SUFFIX, KeyKind, PublicKey, read_public

log = logging.getLogger("pdorch.security")

RECHECK_S = 1.0
# A file the trusted directory may hold beside the public keys: the KV plane's shared password,
# used only with kv_payload: plaintext.
KV_PASSWORD_FILE = "kv.password"

_Signature = tuple[tuple[str, int, int, int], ...]


class TrustedKeys:
    """Thread-safe: the ZAP handler reads it on its own thread, the event loop on another."""

    def __init__(self, directory: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self._clock = clock
        self._lock = threading.Lock()
        self._signature: _Signature | None = None
        self._by_public: dict[str, PublicKey] = {}
        self._by_name: dict[str, PublicKey] = {}
        self._checked_at = float("-inf")
        if not directory.is_dir():
            raise PdorchError(ErrorCode.CONFIG, f"trusted keys directory {directory} does not exist")
        self._refresh(0.0)

    def by_public(self, public: str) -> PublicKey | None:
        self._refresh()
        key = self._by_public.get(public)
        if key is None and self._refresh(0.0):
            key = self._by_public.get(public)
        return key

    def by_name(self, name: str) -> PublicKey | None:
        self._refresh()
        key = self._by_name.get(name)
        if key is None and self._refresh(0.0):
            key = self._by_name.get(name)
        return key

    def only(self, kind: KeyKind) -> PublicKey:
        """The one key of ``kind`` (the scheduler's, the KV broker's): what clients pin."""
        self._refresh()
        found = [k for k in self._by_name.values() if k.kind is kind]
        if len(found) != 1:
            raise PdorchError(
                ErrorCode.CONFIG,
                f"the trusted keys in {self.directory} hold {len(found)} keys of kind {kind}; need exactly 1",
            )
        return found[0]

    def kv_password(self) -> str:
        path = self.directory / KV_PASSWORD_FILE
        try:
            password = path.read_text().strip()
        except OSError:
            raise PdorchError(
                ErrorCode.CONFIG, f"kv_payload plaintext needs the KV password in {path}"
            ) from None
        if len(password) < 32:
            raise PdorchError(ErrorCode.CONFIG, f"{path} must hold at least 32 characters")
        return password

    def _refresh(self, every_s: float = RECHECK_S) -> bool:
        """Look at the directory again if it was last looked at ``every_s`` ago; True if it changed."""
        now = self._clock()
        if now - self._checked_at < every_s:
            return False
        with self._lock:
            self._checked_at = now
            signature = self._scan()
            if signature == self._signature:
                return False
            self._load(signature)
            return True

    def _scan(self) -> _Signature:
        entries = []
        try:
            paths = sorted(self.directory.glob(f"*{PUBLIC_SUFFIX}"))
        except OSError:
            paths = []
        for path in paths:
            try:
                st = path.stat()  # follows the symlinks of a mounted Secret
            except OSError:
                continue
            entries.append((path.name, st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(entries)

    def _load(self, signature: _Signature) -> None:
        by_public: dict[str, PublicKey] = {}
        by_name: dict[str, PublicKey] = {}
        for name, *_ in signature:
            try:
                key = read_public(self.directory / name)
            except PdorchError as e:
                log.error("ignoring trusted key file: %s", e.message)
                continue
            if key.name in by_name or key.public in by_public:
                log.error("ignoring %s: another trusted key has its name or public key", name)
                continue
            by_public[key.public] = by_name[key.name] = key
        if self._signature is not None:
            log.info("trusted keys in %s changed: %s", self.directory, ", ".join(sorted(by_name)) or "none")
        self._by_public, self._by_name, self._signature = by_public, by_name, signature
