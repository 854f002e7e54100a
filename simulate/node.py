"""One simulated instance: its engine plus what the scheduler tracks about it (in flight, reservations)."""

from __future__ import annotations

from scheduler.placement.types import NodeView
from simulate.cache_view import CacheView
from simulate.cluster import InstanceSpec
from simulate.fluid import EngineParams, SimEngine
from workers.engines.sim.cost import CostModel, ModelShape


class SimNode:
    __slots__ = (
        "_view",
        "_view_key",
        "engine",
        "index",
        "inflight",
        "kv_bytes_per_token",
        "model",
        "nic_free_at",
        "rate",
        "reserved_blocks",
        "spec",
        "version",
        "worker_id",
    )

    def __init__(
        self, index: int, spec: InstanceSpec, shape: ModelShape, params: EngineParams, model: str
    ) -> None:
        self.index = index
        self.spec = spec
        self.worker_id = f"{spec.role}-{index:03d}-{spec.accelerator}"
        self.model = model
        self.engine = SimEngine(CostModel(spec.accelerator, spec.tp, shape), params)
        self.inflight = 0  # requests placed here (either side) and not yet done here
        self.reserved_blocks = 0  # sum of reservations of requests decoding here
        self.nic_free_at = 0.0  # the KV link is used by one transfer at a time
        self.version = 0  # bumps when the engine's next event is re-scheduled
        self.rate = self.engine.cost.prefill_tokens_per_s()
        self.kv_bytes_per_token = shape.kv_bytes_per_token
        self._view: NodeView | None = None
        self._view_key: tuple[int, int, int, float] = (-1, -1, -1, -1.0)

    def view(self, t: float) -> NodeView:
        """The node as placement sees it at ``t`` (rebuilt only when something it shows changed)."""
        engine = self.engine
        key = (engine.changes, self.inflight, self.reserved_blocks, t if engine.decoding else -1.0)
        if key == self._view_key and self._view is not None:
            return self._view
        load = engine.load_at(t)
        params = engine.params
        self._view = NodeView(
            worker_id=self.worker_id,
            role=self.spec.role,
            model=self.model,
            accelerator=self.spec.accelerator,
            block_size=params.block_size,
            kv_bytes_per_token=self.kv_bytes_per_token,
            blocks_total=engine.capacity // params.block_size,
            blocks_used=load.blocks_used,
            blocks_reserved=max(0, self.reserved_blocks - load.blocks_used),
            running=load.running,
            waiting=load.waiting,
            queued_prefill_tokens=load.queued_prefill_tokens,
            inflight=self.inflight,
            prefill_tokens_per_s=self.rate,
            cached_block_hashes=CacheView(engine),
        )
        self._view_key = key
        return self._view
