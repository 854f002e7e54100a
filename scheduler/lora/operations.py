"""Loading and unloading a LoRA adapter on every worker of its base model, and waiting for them.

One operation at a time for the cluster (two clients loading the same name cannot interleave),
each bounded by a deadline: a worker that does not answer in time counts as failed. A load
succeeds when the workers that took the adapter can still serve it end to end (a prefill-capable
and a decode-capable one, or one colocated worker); otherwise it is undone where it was done, and
the first worker's reason is the answer. Workers that join later, or come back, are brought in
line with the registry when they register (:meth:`joined`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable

import msgspec

from scheduler.cluster import Cluster, WorkerState
from scheduler.lora.registry import AdapterRegistry, Registration
from transport.errors import ErrorCode, PdorchError
from transport.messages import AdapterAck, AdapterLoad, AdapterUnload, Role, ToWorker

log = logging.getLogger("pdorch.lora")

Send = Callable[[str, ToWorker], bool]


class Outcome(msgspec.Struct, frozen=True):
    done: list[str]  # worker ids
    failed: dict[str, str]  # worker id -> why


class AdapterOperations:
    def __init__(self, cluster: Cluster, *, timeout_s: float, colocated: bool) -> None:
        self.registry = AdapterRegistry()
        self._cluster = cluster
        self._timeout_s = timeout_s
        self._colocated = colocated
        self._send: Send = lambda worker_id, msg: False
        self._waiting: dict[str, tuple[str, asyncio.Future[AdapterAck]]] = {}
        self._lock = asyncio.Lock()

    def bind(self, send: Send) -> None:
        """How messages reach workers (the control plane, which exists after this object)."""
        self._send = send

    # ------------------------------------------------------------------ from the control plane

    def joined(self, worker_id: str) -> None:
        """A worker registered: learn its run-time adapters, then load and unload what differs."""
        worker = self._cluster.get(worker_id)
        if worker is None:
            return
        self.registry.learn(worker.hello)
        for reg in self.registry.to_load(worker.hello):
            self._send(worker_id, AdapterLoad(_op_id(), reg.name, reg.path))
        for name in self.registry.to_unload(worker.hello):
            self._send(worker_id, AdapterUnload(_op_id(), name))

    def acked(self, worker_id: str, ack: AdapterAck) -> None:
        entry = self._waiting.get(ack.op_id)
        if entry is not None and entry[0] == worker_id and not entry[1].done():
            entry[1].set_result(ack)
        elif ack.code:
            log.warning("worker %s: adapter operation failed: %s", worker_id, ack.message)

    # ------------------------------------------------------------------ from the API

    async def load(self, reg: Registration, *, replace: bool) -> Outcome:
        async with _bounded(self._lock, self._timeout_s):
            served = any(reg.name in w.hello.adapters for w in self._cluster.workers())
            if not replace and (served or self.registry.get(reg.name) is not None):
                raise PdorchError(
                    ErrorCode.INVALID_REQUEST, f"the adapter {reg.name!r} has already been loaded"
                )
            targets = [
                w.worker_id
                for w in self._cluster.workers()
                if w.hello.model == reg.base and w.state is WorkerState.READY
            ]
            if not targets:
                raise PdorchError(ErrorCode.NO_WORKER, f"no worker serves the base model {reg.base!r}")
            outcome = await self._each(targets, lambda op: AdapterLoad(op, reg.name, reg.path))
            if not self._servable(outcome.done):
                if outcome.done:
                    await self._each(outcome.done, lambda op: AdapterUnload(op, reg.name))
                first = next(iter(outcome.failed.values()), "no worker answered")
                raise PdorchError(ErrorCode.INVALID_REQUEST, f"cannot load adapter {reg.name!r}: {first}")
            self.registry.register(reg)
            if outcome.failed:
                log.warning("adapter %s not loaded on %s", reg.name, outcome.failed)
            return outcome

    async def unload(self, name: str) -> Outcome:
        async with _bounded(self._lock, self._timeout_s):
            targets = [w.worker_id for w in self._cluster.workers() if name in w.hello.adapters]
            if self.registry.get(name) is None and not targets:
                raise PdorchError(ErrorCode.MODEL_NOT_FOUND, f"the adapter {name!r} cannot be found")
            self.registry.remove(name)
            return await self._each(targets, lambda op: AdapterUnload(op, name))

    # ------------------------------------------------------------------ helpers

    async def _each(self, worker_ids: list[str], message: Callable[[str], ToWorker]) -> Outcome:
        """Send each worker its message and wait (bounded) for every answer."""
        loop = asyncio.get_running_loop()
        sent: dict[str, tuple[str, asyncio.Future[AdapterAck]]] = {}  # op -> (worker, its answer)
        failed: dict[str, str] = {}
        for wid in worker_ids:
            op = _op_id()
            if self._send(wid, message(op)):
                sent[op] = self._waiting[op] = (wid, loop.create_future())
            else:
                failed[wid] = "unreachable"
        try:
            if sent:
                await asyncio.wait([f for _, f in sent.values()], timeout=self._timeout_s)
        finally:
            for op in sent:
                del self._waiting[op]
        done = []
        for wid, future in sent.values():
            if not future.done():
                future.cancel()
                failed[wid] = f"no answer within {self._timeout_s:.0f}s"
            elif future.result().code:
                failed[wid] = future.result().message
            else:
                done.append(wid)
        return Outcome(done, failed)

    def _servable(self, worker_ids: list[str]) -> bool:
        roles = {w.hello.role for wid in worker_ids if (w := self._cluster.get(wid)) is not None}
        if self._colocated or Role.BOTH in roles:
            return bool(roles)
        return Role.PREFILL in roles and Role.DECODE in roles


@contextlib.asynccontextmanager
async def _bounded(lock: asyncio.Lock, timeout_s: float) -> AsyncIterator[None]:
    """The operations lock, waited for at most ``timeout_s`` (then DEADLINE_EXCEEDED)."""
    try:
        async with asyncio.timeout(timeout_s):
            await lock.acquire()
    except TimeoutError:
        raise PdorchError(
            ErrorCode.DEADLINE_EXCEEDED, "another adapter operation is still running; try again"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _op_id() -> str:
    return uuid.uuid4().hex
