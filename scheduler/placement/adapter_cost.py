"""What running a request's LoRA adapter costs on a node, from the adapter residency it reports.

A node holds at most ``adapter_slots`` adapters. A request whose adapter is resident there (or soon
will be: another request booked there uses it) pays nothing; otherwise the node loads it, into a
free slot, or by evicting the least recently used adapter no request is using. When every slot
holds an adapter in use, the request cannot start there until one of them is done: the node is
*blocked* for it. A node that reports no slots (no LoRA, or an engine that does not say) is taken
to cost nothing, so nodes that report nothing are not penalised for it.
"""

from __future__ import annotations

import enum

from scheduler.placement.config import DEFAULT_ADAPTER_LOAD_S, AcceleratorProfile
from scheduler.placement.latency_model import LatencyTable, class_key
from scheduler.placement.types import NodeView


class AdapterState(enum.IntEnum):
    RESIDENT = 0  # held now or soon (or no adapter, or nothing known): no load
    FREE_SLOT = 1  # loads into a free slot
    EVICT = 2  # loads after evicting an idle adapter
    BLOCKED = 3  # every slot holds an adapter in use: waits for one to free


def adapter_state(node: NodeView, adapter: str) -> AdapterState:
    if not adapter or node.adapter_slots <= 0 or adapter in node.adapters_resident:
        return AdapterState.RESIDENT
    if len(node.adapters_resident) < node.adapter_slots:
        return AdapterState.FREE_SLOT
    if len(node.adapters_in_use) < node.adapter_slots:
        return AdapterState.EVICT
    return AdapterState.BLOCKED


def adapter_load_s(node: NodeView, accelerators: dict[str, AcceleratorProfile]) -> float:
    """Seconds one adapter load takes on ``node``'s class."""
    profile = accelerators.get(node.accelerator)
    return DEFAULT_ADAPTER_LOAD_S if profile is None else profile.adapter_load_s


def load_delay_s(
    node: NodeView, adapter: str, accelerators: dict[str, AcceleratorProfile], table: LatencyTable
) -> float:
    """The delay the request's adapter adds on ``node`` before its work can start there: the load
    time learnt for its class, else the configured one (a blocked node counts one load too: the
    placement filter keeps requests off blocked nodes)."""
    if adapter_state(node, adapter) is AdapterState.RESIDENT:
        return 0.0
    learnt = table.adapter_load_s.get(class_key(node.model, node.accelerator))
    return adapter_load_s(node, accelerators) if learnt is None else learnt
