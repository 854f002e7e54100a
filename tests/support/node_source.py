"""A planner's node source for tests: each worker's Hello and last Load, as the live registry or the
simulator has them."""

from __future__ import annotations

from collections.abc import Sequence

from scheduler.node_view import NodeState
from transport.messages import PROTOCOL_VERSION, Hello, Load, Role


def sim_hello(
    worker_id: str, role: Role, accelerator: str = "a100", adapters: Sequence[str] = (), kv_endpoint: str = ""
) -> Hello:
    """A simulated worker of model "m": 16-token blocks, 10,000 of them, 1,000 bytes of KV a token."""
    return Hello(
        protocol_version=PROTOCOL_VERSION,
        worker_id=worker_id,
        role=role,
        engine="sim",
        model="m",
        kv_bytes_per_token=1000,
        block_size=16,
        capacity_blocks=10_000,
        accelerator=accelerator,
        adapters=list(adapters),
        kv_endpoint=kv_endpoint,
    )


class NodeSource:
    def __init__(self) -> None:
        self.states: dict[str, NodeState] = {}

    def add(self, hello: Hello, load: Load) -> None:
        self.states[hello.worker_id] = NodeState(hello, load)

    def node_states(self) -> list[NodeState]:
        return list(self.states.values())
