"""The connector's worker side (runs in vLLM's worker process, beside the model and its KV cache).

- ``register_kv_caches``: numpy views over vLLM's per-layer cache tensors (CPU memory, no copy)
  and the KV plane thread (with a bound receiver on consumer instances).
- prefill: ``save_kv_layer`` hands each layer's prompt blocks to the KV plane as soon as the
  forward pass has written them, so the transfer of layer i overlaps the compute of layer i+1.
- decode: ``start_load_kv`` announces arriving requests to the KV endpoint and starts loads straight
  into the request's allocated blocks.
- ``get_transfer_results`` reports sends over (which ends their block lease) and loads over/failed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from transport.errors import ErrorCode, PdorchError
from transport.kv.receiver import DEFAULT_LIMITS, ReceiverLimits
from transport.kv.same_host import SameHostMode
from transport.security import SecurityConfig
from workers.engines.vllm.block_io import BlockSink, read_blocks
from workers.engines.vllm.connector_metadata import StepPlan
from workers.engines.vllm.kv_plane_thread import KvPlaneThread


def check_layout(*, pipeline: int = 1, context: int = 1, data: int = 1, nodes: int = 1) -> None:
    """The layouts the connector moves: one instance on one host, its KV split by tensor
    parallelism only (each rank sends its part to the same rank of the other instance, whose
    endpoints are derived from rank 0's on one host). With pipeline stages a rank would hold other
    layers, with context parallelism other tokens, with data-parallel ranks other requests, across
    nodes other hosts: refused at startup, with why, rather than failing each handoff later."""
    if max(pipeline, context, data, nodes) > 1:
        raise PdorchError(
            ErrorCode.CONFIG,
            "pdorch's KV connector moves the KV of vLLM instances on one host split by tensor "
            f"parallelism alone; this one has pipeline {pipeline}, context {context} and data "
            f"parallel size {data} on {nodes} nodes (docs/vllm.md)",
        )


def as_numpy(tensor: Any) -> np.ndarray:
    """A numpy view of a CPU torch tensor; dtypes numpy lacks (bfloat16, fp8) as raw integers. A
    cache in device memory is refused: the KV plane reads and writes host memory."""
    if isinstance(tensor, np.ndarray):
        return tensor
    import torch

    if tensor.device.type != "cpu":
        raise PdorchError(
            ErrorCode.CONFIG,
            f"pdorch's KV connector moves KV caches in host memory (vLLM's CPU backend); this one is "
            f"on {tensor.device} (docs/vllm.md)",
        )

    if tensor.dtype in (torch.float32, torch.float16, torch.int8, torch.uint8):
        return tensor.numpy()
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[tensor.element_size()]
    return tensor.view(width).numpy()


class PdorchWorkerSide:
    def __init__(
        self,
        *,
        bind: str | None,
        security: SecurityConfig,
        same_host: SameHostMode = SameHostMode.AUTO,
        limits: ReceiverLimits = DEFAULT_LIMITS,
        arrival_notes: str = "",
        rank: int = 0,
    ) -> None:
        """``security``: this instance's keys, the same as its agent's (the decode worker's KV
        endpoint is this instance's, and senders pin the agent's key). ``same_host``: whether KV
        to and from instances on this host goes through shared memory. ``limits``: what its KV
        endpoint admits. ``arrival_notes``: where its agent hears that a load's KV is arriving.
        ``rank``: this worker process's tensor-parallel rank (its part of the KV, its endpoint)."""
        self._bind = bind
        self._rank = rank
        self._arrival_notes = arrival_notes
        self._security = security
        self._same_host = same_host
        self._limits = limits
        self._layers: list[np.ndarray] = []
        self._index: dict[str, int] = {}
        self._kv: KvPlaneThread | None = None
        self._send_ids: set[str] = set()  # requests with a send in flight or over, not yet reported
        self._sends_over: set[str] = set()
        self._finished: set[str] = set()  # of those, the ones vLLM says have finished
        # Sends whose step is over. vLLM may call wait_for_save (and even bind the same metadata)
        # more than once; a send is streamed and ended exactly once.
        self._closed: set[str] = set()

    @property
    def kv(self) -> KvPlaneThread:
        assert self._kv is not None, "register_kv_caches was not called"
        return self._kv

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self._index = {name: i for i, name in enumerate(kv_caches)}
        self._layers = [as_numpy(t) for t in kv_caches.values()]
        first = self._layers[0]
        self._kv = KvPlaneThread(
            bind=self._bind,
            num_layers=len(self._layers),
            row_shape=tuple(first.shape[1:]),
            dtype=first.dtype,
            security=self._security,
            same_host=self._same_host,
            limits=self._limits,
            arrival_notes=self._arrival_notes,
            rank=self._rank,
        )

    def start_load_kv(self, plan: StepPlan) -> None:
        # Announcements first: a request may arrive and start its load in the same step.
        for params in plan.announce:
            self.kv.announce_recv(params)
        for params in plan.withdraw:
            self.kv.withdraw_recv(params)
        for spec in plan.recvs:
            self.kv.start_recv(spec, BlockSink(self._layers, spec.block_ids, spec.skip_rows))
        for req_id in plan.cancel_recvs:
            self.kv.cancel_recv(req_id)

    def save_kv_layer(self, plan: StepPlan, layer_name: str) -> None:
        if not plan.sends:
            return
        layer = self._index[layer_name]
        for spec in plan.sends:
            if spec.req_id in self._closed:
                continue
            self._send_ids.add(spec.req_id)
            self.kv.send_layer(spec, layer, read_blocks(self._layers[layer], spec.block_ids))

    def wait_for_save(self, plan: StepPlan) -> None:
        for spec in plan.sends:
            if spec.req_id in self._closed:
                continue
            self._closed.add(spec.req_id)
            self._send_ids.add(spec.req_id)
            self.kv.end_send(spec)

    def get_transfer_results(self, finished_req_ids: set[str]) -> tuple[set[str], set[str], set[str]]:
        sends_over, recvs_over, recvs_failed = self.kv.take_finished()
        self._sends_over |= sends_over
        self._finished |= finished_req_ids & self._send_ids
        # vLLM accepts a "finished sending" only for a request it has already told us finished.
        ready = self._sends_over & self._finished
        self._sends_over -= ready
        self._finished -= ready
        self._send_ids -= ready
        self._closed -= ready
        return ready, recvs_over, recvs_failed

    def shutdown(self) -> None:
        if self._kv is not None:
            self._kv.close()
