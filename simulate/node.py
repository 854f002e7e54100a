"""One simulated instance: its engine, and the ``Hello`` and ``Load`` it would send a live scheduler.

What the scheduler books on it (reservations, prefills sent, requests decoding) is in the
simulation's :class:`~scheduler.ledger.ledger.Ledger`, as it is for a live worker; placement sees
both through the one view builder (``scheduler/node_view.py``).
"""

from __future__ import annotations

from scheduler.node_view import NodeState
from simulate.cluster import InstanceSpec
from simulate.fluid import EngineParams, SimEngine
from transport.messages import PROTOCOL_VERSION, Hello, Load
from workers.engines.sim.cost import CostModel, ModelShape


class SimNode:
    __slots__ = (
        "_state",
        "_state_key",
        "engine",
        "hello",
        "index",
        "nic_free_at",
        "spec",
        "version",
        "worker_id",
    )

    def __init__(
        self,
        index: int,
        spec: InstanceSpec,
        shape: ModelShape,
        params: EngineParams,
        model: str,
        adapters: list[str] | None = None,
    ) -> None:
        self.index = index
        self.spec = spec
        self.worker_id = f"{spec.role}-{index:03d}-{spec.accelerator}"
        self.engine = SimEngine(CostModel(spec.accelerator, spec.tp, shape, slowdown=spec.slowdown), params)
        self.hello = Hello(
            protocol_version=PROTOCOL_VERSION,
            worker_id=self.worker_id,
            role=spec.role,
            engine="sim",
            model=model,
            kv_bytes_per_token=shape.kv_bytes_per_token,
            block_size=params.block_size,
            capacity_blocks=self.engine.capacity // params.block_size,
            accelerator=spec.accelerator,
            adapters=adapters or [],
            # Every simulated worker takes handoffs, as a live agent of an engine that moves its own
            # KV binds a KV endpoint whatever its role (workers/main.py).
            kv_endpoint=f"sim://{self.worker_id}",
        )
        self.nic_free_at = 0.0  # the KV link is used by one transfer at a time
        self.version = 0  # bumps when the engine's next event is re-scheduled
        self._state: NodeState | None = None
        self._state_key: tuple[int, float] = (-1, -1.0)

    def state(self, t: float) -> NodeState:
        """What the node reports at ``t`` (rebuilt only when it changed)."""
        engine = self.engine
        key = (engine.changes, t if engine.decoding else -1.0)
        if key == self._state_key and self._state is not None:
            return self._state
        load = engine.load_at(t)
        params = engine.params
        self._state = NodeState(
            self.hello,
            Load(
                blocks_used=load.blocks_used,
                blocks_total=self.hello.capacity_blocks,
                running=load.running,
                waiting=load.waiting,
                queued_prefill_tokens=load.queued_prefill_tokens,
                cached_blocks=len(engine.cache) * params.prefix_block_tokens // params.block_size,
                adapter_slots=params.max_loras,
                adapters_resident=engine.adapters.resident(),
                decoded_tokens=engine.generated_at(t),
            ),
        )
        self._state_key = key
        return self._state
