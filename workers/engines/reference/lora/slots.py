"""Which adapters an engine knows, and which are resident: at most ``slots`` at once, LRU.

Registering an adapter reads and checks it at once (a bad directory is refused then, not at the
first request). A request takes a reference on its adapter for as long as it runs; an adapter
nobody references may be evicted to make room for another, and is read again from its path when
asked for next. Unregistering an adapter that requests still use stops new requests at once and
frees its slot when the last of them releases it. Thread-safe: requests are added from the agent's
thread, released from the engine's.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from transport.errors import ErrorCode, PdorchError
from workers.engines.reference.config import ModelConfig
from workers.engines.reference.lora.adapter import LoraAdapter, load_adapter


class AdapterSlots:
    def __init__(self, cfg: ModelConfig, slots: int) -> None:
        if slots < 0:
            raise PdorchError(ErrorCode.CONFIG, f"LoRA slots must not be negative, got {slots}")
        self._cfg = cfg
        self.slots = slots
        self._paths: dict[str, Path] = {}
        self._resident: OrderedDict[str, LoraAdapter] = OrderedDict()  # least recently used first
        self._users: dict[str, int] = {}
        self._salts: dict[str, bytes] = {}
        # Unregistered while requests still use them: no new request may, the last frees the slot.
        self._retired: set[str] = set()
        self._lock = threading.Lock()

    def register(self, name: str, path: str | Path) -> None:
        """Know ``name`` as the adapter at ``path`` (read now, resident if a slot can be had)."""
        if not name:
            raise PdorchError(ErrorCode.INVALID_REQUEST, "an adapter needs a name")
        if self.slots == 0:
            raise PdorchError(ErrorCode.CONFIG, "this engine serves no LoRA adapters (0 slots)")
        adapter = load_adapter(name, path, self._cfg)
        with self._lock:
            if self._users.get(name):
                raise PdorchError(ErrorCode.INVALID_REQUEST, f"adapter {name!r} is in use; unload it first")
            self._retired.discard(name)
            self._paths[name] = Path(path)
            self._salts[name] = adapter.salt
            self._resident.pop(name, None)
            if self._make_room():
                self._resident[name] = adapter

    def unregister(self, name: str) -> None:
        with self._lock:
            if name not in self._paths or name in self._retired:
                raise PdorchError(ErrorCode.MODEL_NOT_FOUND, f"adapter {name!r} is not loaded")
            if self._users.get(name):
                self._retired.add(name)  # the requests using it keep it until they end
                return
            self._forget(name)

    def _forget(self, name: str) -> None:
        del self._paths[name]
        del self._salts[name]
        self._resident.pop(name, None)
        self._retired.discard(name)

    def known(self) -> list[str]:
        with self._lock:
            return sorted(n for n in self._paths if n not in self._retired)

    def salt(self, name: str) -> bytes:
        """The registered adapter's identity (its name and weights): equal on every worker that
        registered the same file under the same name."""
        with self._lock:
            salt = self._salts.get(name)
        if salt is None:
            raise PdorchError(ErrorCode.MODEL_NOT_FOUND, f"adapter {name!r} is not loaded here")
        return salt

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._resident)

    def acquire(self, name: str) -> LoraAdapter:
        """The adapter, resident and referenced until :meth:`release`. Raises MODEL_NOT_FOUND for
        an unknown name and QUEUE_FULL when every slot holds an adapter in use."""
        with self._lock:
            path = self._paths.get(name)
            if path is None or name in self._retired:
                raise PdorchError(ErrorCode.MODEL_NOT_FOUND, f"adapter {name!r} is not loaded here")
            adapter = self._resident.get(name)
            if adapter is None:
                if not self._make_room():
                    raise PdorchError(
                        ErrorCode.QUEUE_FULL, f"all {self.slots} LoRA slots hold adapters in use"
                    )
                # Read under the lock: a second request for the same adapter waits for this one.
                adapter = load_adapter(name, path, self._cfg)
                if adapter.salt != self._salts[name]:
                    raise PdorchError(
                        ErrorCode.CONFIG,
                        f"adapter {name!r} changed on disk since it was loaded; load it again",
                    )
                self._resident[name] = adapter
            self._resident.move_to_end(name)
            self._users[name] = self._users.get(name, 0) + 1
            return adapter

    def release(self, adapter: LoraAdapter) -> None:
        with self._lock:
            left = self._users.get(adapter.name, 0) - 1
            if left > 0:
                self._users[adapter.name] = left
                return
            self._users.pop(adapter.name, None)
            if adapter.name in self._retired:
                self._forget(adapter.name)

    def _make_room(self) -> bool:
        """Evict least recently used adapters nobody references until a slot is free."""
        while len(self._resident) >= self.slots:
            idle = next((n for n in self._resident if not self._users.get(n)), None)
            if idle is None:
                return False
            del self._resident[idle]
        return True
