"""What the connector's scheduler side tells its worker side each step (no vLLM imports here).

vLLM ships the metadata object from the EngineCore process to the worker process inside the
scheduler output; these Structs are plain data so that works whatever the serializer.
"""

from __future__ import annotations

import msgspec

from workers.engines.vllm.transfer_params import PdorchKvParams


class SendSpec(msgspec.Struct, frozen=True):
    """Push a request's prompt blocks: this step computes the end of its prompt."""

    req_id: str
    params: PdorchKvParams
    block_ids: list[int]
    num_tokens: int
    # Upper bound on how long the blocks stay leased for this send.
    lease_s: float


class RecvSpec(msgspec.Struct, frozen=True):
    """Load a request's prompt blocks into ``block_ids``.

    The sender sends every prompt block; the first ``skip_rows`` are already here (local prefix
    cache hit) and are dropped.
    """

    req_id: str
    params: PdorchKvParams
    block_ids: list[int]
    skip_rows: int
    num_tokens: int


class StepPlan(msgspec.Struct):
    sends: list[SendSpec] = []
    recvs: list[RecvSpec] = []
    # Loads whose request vLLM dropped (aborted while waiting): stop them early.
    cancel_recvs: list[str] = []
    # Decode requests that arrived this step: their KV may arrive while they wait in vLLM's queue.
    announce: list[PdorchKvParams] = []
    # ... and those of them that ended (or needed no load) before their load started.
    withdraw: list[PdorchKvParams] = []
