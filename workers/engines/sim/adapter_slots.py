"""LoRA adapter slots of a simulated engine: which adapters are resident, and which are in use.

At most ``slots`` adapters are resident; loading another evicts the least recently used one that
no request is using. A request pins its adapter while it runs here; an adapter pinned by anyone is
never evicted, so when every slot holds a pinned adapter a new one must wait.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class AdapterSlots:
    def __init__(self, slots: int) -> None:
        self.slots = slots  # 0 = unlimited and free: adapters are not modelled
        self._resident: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._of: dict[Hashable, str] = {}  # request -> the adapter it pins
        self._pins: dict[str, int] = {}  # adapter -> requests pinning it

    def resident(self) -> list[str]:
        """Resident adapters, least recently used first."""
        return list(self._resident)

    def can_pin(self, rid: Hashable, adapter: str) -> bool:
        if not adapter or self.slots <= 0 or adapter in self._resident or rid in self._of:
            return True
        return len(self._resident) < self.slots or len(self._pins) < self.slots

    def pin(self, rid: Hashable, adapter: str) -> int:
        """Pin ``rid``'s adapter (check :meth:`can_pin` first); 1 if it had to be loaded, else 0."""
        if not adapter or self.slots <= 0 or rid in self._of:
            return 0
        self._of[rid] = adapter
        self._pins[adapter] = self._pins.get(adapter, 0) + 1
        if adapter in self._resident:
            self._resident.move_to_end(adapter)
            return 0
        if len(self._resident) >= self.slots:
            del self._resident[next(a for a in self._resident if a not in self._pins)]
        self._resident[adapter] = None
        return 1

    def unpin(self, rid: Hashable) -> None:
        adapter = self._of.pop(rid, None)
        if adapter is None:
            return
        left = self._pins[adapter] - 1
        if left:
            self._pins[adapter] = left
        else:
            del self._pins[adapter]
