"""The worker registry: the only mutable cluster state in the scheduler.

It knows every registered worker (from its ``Hello``), its liveness and last reported load, the
requests the scheduler has placed on it, and the KV blocks reserved there for those requests
(Reserve/Unreserve). Placement never reads it directly: it reads an immutable snapshot.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from scheduler.placement.kv_budget import outstanding_blocks
from scheduler.placement.types import ClusterSnapshot, NodeView
from transport.liveness import PeerLiveness
from transport.messages import Hello, Load, Role


class WorkerState(enum.StrEnum):
    READY = "ready"
    DRAINING = "draining"


@dataclass
class Held:
    """What one request holds on one worker, as the scheduler accounts it."""

    reserved_blocks: int = 0  # KV blocks reserved (prompt + predicted output), 0 on a prefill node
    tokens: int = 0  # tokens the request has there so far (prompt + generated)


class PrefixMemory:
    """The prompt-prefix block hashes the scheduler sent to a worker, most recent last (bounded).

    It is what the scheduler *knows* a node has seen, not a copy of the engine's cache; the
    prefix-affinity scorer only needs it to be mostly right (llm-d's approximate prefix scorer).
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = max(1, capacity)
        self._hashes: OrderedDict[int, None] = OrderedDict()
        self._frozen: frozenset[int] | None = frozenset()

    def add(self, hashes: Iterable[int]) -> None:
        for h in hashes:
            self._hashes[h] = None
            self._hashes.move_to_end(h)
        while len(self._hashes) > self._capacity:
            self._hashes.popitem(last=False)
        self._frozen = None

    def frozen(self) -> frozenset[int]:
        if self._frozen is None:
            self._frozen = frozenset(self._hashes)
        return self._frozen


@dataclass
class Worker:
    hello: Hello
    identity: bytes  # the control connection's routing id (the scheduler's ROUTER names it)
    liveness: PeerLiveness
    state: WorkerState = WorkerState.READY
    load: Load = field(default_factory=Load)
    requests: dict[str, Held] = field(default_factory=dict)
    # Prompt tokens sent here for prefill and not yet answered with a first token.
    pending_prefill_tokens: int = 0
    # The key its control connection authenticated with ("" without authentication); its KV
    # endpoint serves with the same key, which senders pin (``KvRoute.server_key``).
    key_name: str = ""
    public_key: str = ""
    # Sized like the worker's KV cache: it cannot hold more distinct blocks than that.
    prefixes: PrefixMemory = field(init=False)

    def __post_init__(self) -> None:
        self.prefixes = PrefixMemory(self.hello.capacity_blocks)

    @property
    def worker_id(self) -> str:
        return self.hello.worker_id

    @property
    def reserved_blocks(self) -> int:
        """Reservations not yet backed by blocks the worker reports as used (not counted twice)."""
        bs = self.hello.block_size
        return sum(outstanding_blocks(h.reserved_blocks, h.tokens, bs) for h in self.requests.values())

    def view(self) -> NodeView:
        h = self.hello
        return NodeView(
            worker_id=h.worker_id,
            role=h.role,
            model=h.model,
            accelerator=h.accelerator,
            draining=self.state is WorkerState.DRAINING,
            block_size=h.block_size,
            kv_bytes_per_token=h.kv_bytes_per_token,
            blocks_total=self.load.blocks_total or h.capacity_blocks,
            blocks_used=self.load.blocks_used,
            blocks_reserved=self.reserved_blocks,
            running=self.load.running,
            waiting=self.load.waiting,
            queued_prefill_tokens=self.load.queued_prefill_tokens + self.pending_prefill_tokens,
            inflight=len(self.requests),
            kv_refusing=self.load.kv_refusing,
            cached_block_hashes=self.prefixes.frozen(),
        )


# Called with (worker_id, request ids that were placed on it, reason) when a worker is dropped.
LostHandler = Callable[[str, list[str], str], None]


class Cluster:
    def __init__(self, *, heartbeat_interval_s: float, heartbeat_liveness: int, on_lost: LostHandler) -> None:
        self._interval = heartbeat_interval_s
        self._liveness = heartbeat_liveness
        self._on_lost = on_lost
        self._by_id: dict[str, Worker] = {}
        self._by_identity: dict[bytes, Worker] = {}
        self._expected: dict[str, set[str]] = {}
        self.dropped_total = 0

    # ------------------------------------------------------------------ registration and liveness

    def register(
        self, identity: bytes, hello: Hello, now: float, *, key_name: str = "", public_key: str = ""
    ) -> Worker:
        old = self._by_id.get(hello.worker_id)
        if old is not None:
            # A re-Hello means the agent restarted or reconnected: whatever we placed there is gone.
            self.drop_worker(hello.worker_id, "worker re-registered")
        liveness = PeerLiveness(self._interval, self._liveness, now)
        worker = Worker(hello, identity, liveness, key_name=key_name, public_key=public_key)
        self._by_id[hello.worker_id] = worker
        self._by_identity[identity] = worker
        return worker

    def by_identity(self, identity: bytes) -> Worker | None:
        return self._by_identity.get(identity)

    def get(self, worker_id: str) -> Worker | None:
        return self._by_id.get(worker_id)

    def workers(self) -> list[Worker]:
        return list(self._by_id.values())

    def expire(self, now: float) -> list[str]:
        dead = [w.worker_id for w in self._by_id.values() if w.liveness.expired(now)]
        for worker_id in dead:
            self.drop_worker(worker_id, "heartbeat expired")
        return dead

    def drop_worker(self, worker_id: str, reason: str) -> None:
        worker = self._by_id.pop(worker_id, None)
        if worker is None:
            return
        self._by_identity.pop(worker.identity, None)
        self.dropped_total += 1
        lost = list(worker.requests)
        worker.requests.clear()
        if lost:
            self._on_lost(worker_id, lost, reason)

    # ------------------------------------------------------------------ WorkerDirectory (Kubernetes)

    def set_expected(self, pool: str, worker_ids: set[str]) -> None:
        self._expected[pool] = set(worker_ids)

    def expected(self) -> dict[str, set[str]]:
        return {pool: set(ids) for pool, ids in self._expected.items()}

    def set_draining(self, worker_id: str, draining: bool) -> None:
        worker = self._by_id.get(worker_id)
        if worker is not None:
            worker.state = WorkerState.DRAINING if draining else WorkerState.READY

    def inflight(self, worker_id: str) -> int:
        worker = self._by_id.get(worker_id)
        return 0 if worker is None else len(worker.requests)

    # ------------------------------------------------------------------ requests on workers

    def assign(
        self,
        worker_id: str,
        request_id: str,
        reserve_blocks: int = 0,
        tokens: int = 0,
        prefix_hashes: Iterable[int] = (),
    ) -> None:
        """Record the request on the worker (Reserve ``reserve_blocks`` there)."""
        worker = self._by_id[worker_id]
        worker.requests[request_id] = Held(reserve_blocks, tokens)
        worker.prefixes.add(prefix_hashes)

    def held(self, worker_id: str, request_id: str) -> Held | None:
        worker = self._by_id.get(worker_id)
        return None if worker is None else worker.requests.get(request_id)

    def release(self, worker_id: str, request_id: str) -> None:
        """Unreserve and forget the request on that worker. Idempotent."""
        worker = self._by_id.get(worker_id)
        if worker is not None:
            worker.requests.pop(request_id, None)

    def add_pending_prefill(self, worker_id: str, tokens: int) -> None:
        worker = self._by_id.get(worker_id)
        if worker is not None:
            worker.pending_prefill_tokens = max(0, worker.pending_prefill_tokens + tokens)

    # ------------------------------------------------------------------ reading

    def snapshot(self) -> ClusterSnapshot:
        return ClusterSnapshot(tuple(w.view() for w in self._by_id.values()))

    def models(self) -> list[str]:
        return sorted({w.hello.model for w in self._by_id.values()})

    def has_role(self, role: Role) -> bool:
        wanted = {Role.PREFILL: (Role.PREFILL, Role.BOTH), Role.DECODE: (Role.DECODE, Role.BOTH)}.get(
            role, (role,)
        )
        return any(w.hello.role in wanted and w.state is WorkerState.READY for w in self._by_id.values())

    def can_serve(self, colocated: bool) -> bool:
        """Is there any worker for each role a request needs (it may still be busy)?"""
        if colocated:
            return any(
                w.hello.role is Role.BOTH and w.state is WorkerState.READY for w in self._by_id.values()
            )
        return self.has_role(Role.PREFILL) and self.has_role(Role.DECODE)

    def hello_for_model(self, model: str) -> Hello | None:
        """A worker's hello for a model, or for a LoRA adapter a worker serves (whose base model
        is then ``hello.model``)."""
        for w in self._by_id.values():
            if w.hello.model == model or model in w.hello.adapters:
                return w.hello
        return None

    def adapters(self) -> dict[str, str]:
        """The LoRA adapters some worker serves -> their base model."""
        return {a: w.hello.model for w in self._by_id.values() for a in w.hello.adapters}

    def without_adapter(self, adapter: str) -> frozenset[str]:
        """The workers that cannot run a request for ``adapter`` (placement leaves them out)."""
        return frozenset(wid for wid, w in self._by_id.items() if adapter not in w.hello.adapters)
