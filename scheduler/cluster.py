"""The worker registry: the only mutable cluster state in the scheduler.

It knows every registered worker (from its ``Hello``), its liveness and last reported load. What the
scheduler placed on each (jobs, KV reservations, prefills sent) is in its :class:`Ledger`, the one
the planner books decisions in and the simulator uses too. Placement never reads either: the planner
builds it an immutable snapshot (``scheduler/node_view.py``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from scheduler.ledger.ledger import Ledger
from scheduler.ledger.node_ledger import Held, NodeLedger
from scheduler.node_view import NodeState
from transport.liveness import PeerLiveness
from transport.messages import Hello, Load, Role


class WorkerState(enum.StrEnum):
    READY = "ready"
    DRAINING = "draining"


@dataclass
class Worker:
    hello: Hello
    identity: bytes  # the control connection's routing id (the scheduler's ROUTER names it)
    liveness: PeerLiveness
    # What the scheduler booked on it (shared with the planner through the cluster's ledger).
    ledger: NodeLedger
    state: WorkerState = WorkerState.READY
    load: Load = field(default_factory=Load)
    # The key its control connection authenticated with ("" without authentication); its KV
    # endpoint serves with the same key, which senders pin (``KvRoute.server_key``).
    key_name: str = ""
    public_key: str = ""

    @property
    def worker_id(self) -> str:
        return self.hello.worker_id

    @property
    def requests(self) -> dict[str, Held]:
        """The jobs placed on it and what each holds there."""
        return self.ledger.held

    @property
    def reserved_blocks(self) -> int:
        """Reservations not yet backed by blocks the worker reports as used (not counted twice)."""
        return self.ledger.reserved_blocks

    @property
    def pending_prefill_tokens(self) -> int:
        """Prompt tokens sent here for prefill and not yet answered with a first token."""
        return self.ledger.pending_tokens

    def state_for_placement(self) -> NodeState:
        return NodeState(self.hello, self.load, self.state is WorkerState.DRAINING)


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
        self.ledger = Ledger()

    # ------------------------------------------------------------------ registration and liveness

    def register(
        self, identity: bytes, hello: Hello, now: float, *, key_name: str = "", public_key: str = ""
    ) -> Worker:
        old = self._by_id.get(hello.worker_id)
        if old is not None:
            # A re-Hello means the agent restarted or reconnected: whatever we placed there is gone.
            self.drop_worker(hello.worker_id, "worker re-registered")
        node = self.ledger.add_node(
            hello.worker_id,
            hello.model,
            hello.accelerator,
            block_size=hello.block_size,
            kv_bytes_per_token=hello.kv_bytes_per_token,
            capacity_tokens=hello.capacity_blocks * hello.block_size,
        )
        liveness = PeerLiveness(self._interval, self._liveness, now)
        worker = Worker(hello, identity, liveness, node, key_name=key_name, public_key=public_key)
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
        lost = self.ledger.drop_node(worker_id)
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

    def node_states(self) -> list[NodeState]:
        """Every registered worker as placement needs it (the planner's node source)."""
        return [w.state_for_placement() for w in self._by_id.values()]

    # ------------------------------------------------------------------ reading

    def models(self) -> list[str]:
        return sorted({w.hello.model for w in self._by_id.values()})

    def has_role(self, role: Role) -> bool:
        wanted = {Role.PREFILL: (Role.PREFILL, Role.BOTH), Role.DECODE: (Role.DECODE, Role.BOTH)}.get(
            role, (role,)
        )
        return any(w.hello.role in wanted and w.state is WorkerState.READY for w in self._by_id.values())

    def can_serve(self, colocated: bool, whole: frozenset[Role]) -> bool:
        """Is there a worker for each role a request needs (it may still be busy)? A prefill and a
        decode worker, or one worker of a role placement may run a request on whole (``whole``,
        the placer's ``whole_request_roles``); a colocated deployment needs a "both" worker."""
        ready = {w.hello.role for w in self._by_id.values() if w.state is WorkerState.READY}
        if colocated:
            return Role.BOTH in ready
        split = bool(ready & {Role.PREFILL, Role.BOTH}) and bool(ready & {Role.DECODE, Role.BOTH})
        return split or bool(ready & whole)

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
