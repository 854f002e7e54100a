"""LoRA adapters loaded and unloaded at run time, on the scheduler's word (``AdapterLoad`` /
``AdapterUnload``), each answered with an ``AdapterAck`` that lists the adapters served after it.

A path is loaded only from under the worker's allowed directories (``--lora-root``; none: run-time
loading is off), checked after resolving symbolic links, so even an authenticated scheduler cannot
make a worker read files elsewhere. Operations run one at a time, off the control loop (reading an
adapter takes a while); a bounded number wait, and more are answered with an error at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from transport.errors import ErrorCode, PdorchError
from transport.messages import AdapterAck, AdapterLoad, AdapterUnload, FromWorker
from transport.routed import cancel_and_wait
from workers.engines.base import Engine

log = logging.getLogger("pdorch.agent")

MAX_PENDING = 64


class AdapterOps:
    def __init__(self, engine: Engine, roots: list[str], send: Callable[[FromWorker], None]) -> None:
        self._engine = engine
        self._roots = [Path(r).resolve() for r in roots]
        self._send = send
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        # Adapters loaded at run time -> where from (Hello carries it to a scheduler that restarts).
        self.paths: dict[str, str] = {}

    def handle(self, msg: AdapterLoad | AdapterUnload) -> None:
        if len(self._tasks) >= MAX_PENDING:
            self._ack(msg.op_id, ErrorCode.QUEUE_FULL, f"{MAX_PENDING} adapter operations already wait")
            return
        task = asyncio.create_task(self._run(msg), name=f"adapter-{msg.op_id[:32]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        await cancel_and_wait(list(self._tasks))

    async def _run(self, msg: AdapterLoad | AdapterUnload) -> None:
        async with self._lock:
            try:
                if isinstance(msg, AdapterLoad):
                    path = self._allowed(msg.path)
                    await self._engine.load_adapter(msg.name, str(path))
                    self.paths[msg.name] = str(path)
                    log.info("serving LoRA adapter %s from %s", msg.name, path)
                else:
                    await self._engine.unload_adapter(msg.name)
                    self.paths.pop(msg.name, None)
                    log.info("no longer serving LoRA adapter %s", msg.name)
            except PdorchError as e:
                self._ack(msg.op_id, e.code, e.message)
            except Exception as e:  # an engine bug must still be answered
                log.exception("adapter operation %s failed", msg.op_id)
                self._ack(msg.op_id, ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")
            else:
                self._ack(msg.op_id)

    def _allowed(self, path: str) -> Path:
        if not self._roots:
            raise PdorchError(
                ErrorCode.CONFIG, "this worker loads no adapters at run time (start it with --lora-root DIR)"
            )
        if not path or "\0" in path:
            raise PdorchError(ErrorCode.INVALID_REQUEST, "an adapter path must be a non-empty path")
        resolved = Path(path).resolve()
        if not any(resolved.is_relative_to(root) for root in self._roots):
            raise PdorchError(
                ErrorCode.INVALID_REQUEST,
                f"adapter path {path!r} is outside this worker's adapter directories",
            )
        return resolved

    def _ack(self, op_id: str, code: str = "", message: str = "") -> None:
        self._send(AdapterAck(op_id, list(self._engine.info().adapters), code, message))
