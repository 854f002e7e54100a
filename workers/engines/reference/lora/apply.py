"""Adding the adapters' low-rank updates to a batch whose rows belong to different adapters.

The base projection runs once for the whole batch; each adapter then adds its update to its own
rows only (rows of the base model get none). A prompt chunk has one adapter for all its rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from workers.engines.reference.lora.adapter import LoraAdapter

# (adapter, the batch rows it serves): every row at most once.
LoraGroups = list[tuple[LoraAdapter, slice | np.ndarray]]


def groups_of(adapters: Sequence[LoraAdapter | None]) -> LoraGroups:
    """Rows grouped by adapter, one group per adapter present (rows without one are left out)."""
    rows: dict[int, list[int]] = {}
    by_id: dict[int, LoraAdapter] = {}
    for row, adapter in enumerate(adapters):
        if adapter is not None:
            rows.setdefault(id(adapter), []).append(row)
            by_id[id(adapter)] = adapter
    return [(by_id[key], np.asarray(r, dtype=np.intp)) for key, r in rows.items()]


def add_update(
    out: np.ndarray, x: np.ndarray, groups: LoraGroups, layer: int, target: str, columns: slice = slice(None)
) -> None:
    """``out[rows, columns] += x[rows] @ A @ B`` for each group whose adapter adapts ``target``."""
    for adapter, rows in groups:
        delta = adapter.layers[layer].get(target)
        if delta is not None:
            out[rows, columns] += (x[rows] @ delta.a) @ delta.b
