"""The connector's scheduler side (runs in vLLM's EngineCore process): pure bookkeeping.

It decides, per request carrying pdorch ``kv_transfer_params``:

- decode side (``recv``): the whole prompt's KV will come from outside, asynchronously; vLLM parks
  the request (WAITING_FOR_REMOTE_KVS) until the worker side reports the load finished. A request
  is announced to the KV endpoint as soon as it arrives, because vLLM may keep it queued (no free
  sequence slot) for longer than the endpoint keeps a begin nobody expects; one that ends, or needs
  no load, before its load starts is withdrawn, so its sender is let go at once.
- prefill side (``send``): in the step that computes the end of the prompt, the worker side
  pushes the prompt's blocks, layer by layer as the forward pass writes them. When the request
  finishes, its blocks stay allocated (``delay_free``) until the worker side reports the send over;
  the worker bounds that with a lease, so blocks are never stranded.

Only duck-typed attributes of vLLM's ``Request``/``SchedulerOutput``/``KVCacheBlocks`` are used, so
this file imports nothing from vLLM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from workers.engines.vllm.connector_metadata import RecvSpec, SendSpec, StepPlan
from workers.engines.vllm.transfer_params import RECV, SEND, PdorchKvParams, parse_kv_transfer_params

# Looks up all block ids of a request (vLLM's KVCacheManager.get_block_ids, first group).
BlockIdsOf = Callable[[str], list[int]]


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class PdorchSchedulerSide:
    def __init__(self, block_size: int, max_lease_s: float) -> None:
        self.block_size = block_size
        self.max_lease_s = max_lease_s
        self._params: dict[str, PdorchKvParams] = {}
        self._prompt_len: dict[str, int] = {}
        self._load_planned: set[str] = set()  # recv requests whose load was planned (once only)
        self._loading: set[str] = set()  # loads the worker has not reported finished
        self._send_planned: set[str] = set()  # sends handed to the worker: blocks must be leased
        self._plan = StepPlan()

    # ------------------------------------------------------------------ request arrival

    def on_new_request(self, request: Any) -> None:
        params = parse_kv_transfer_params(request.kv_transfer_params)
        if params is not None:
            self._params[request.request_id] = params
            self._prompt_len[request.request_id] = len(request.prompt_token_ids or [])
            if params.direction == RECV:
                self._plan.announce.append(params)

    # ------------------------------------------------------------------ decode side: loads

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        params = self._params.get(request.request_id)
        if params is None or params.direction != RECV or request.request_id in self._load_planned:
            return 0, False
        # Every prompt token the local prefix cache does not hold comes from the prefill worker.
        # vLLM then recomputes just the last prompt position to sample the next token.
        count = self._prompt_len[request.request_id] - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        req_id = request.request_id
        params = self._params.get(req_id)
        if params is None or params.direction != RECV or req_id in self._load_planned:
            return
        self._load_planned.add(req_id)
        if num_external_tokens <= 0:  # the local prefix cache holds it all: nothing to load
            self._plan.withdraw.append(params)
            return
        prompt_len = self._prompt_len[req_id]
        local_tokens = prompt_len - num_external_tokens
        skip = local_tokens // self.block_size
        all_ids = list(blocks.get_block_ids()[0])
        needed = blocks_for(prompt_len, self.block_size)
        self._plan.recvs.append(
            RecvSpec(
                req_id=req_id,
                params=params,
                block_ids=all_ids[skip:needed],
                skip_rows=skip,
                num_tokens=prompt_len,
            )
        )
        self._loading.add(req_id)

    def update_connector_output(self, finished_recving: set[str] | None) -> None:
        for req_id in finished_recving or ():
            self._loading.discard(req_id)

    # ------------------------------------------------------------------ prefill side: sends

    def _plan_send(self, req_id: str, computed_before: int, scheduled: int, block_ids_of: BlockIdsOf) -> None:
        params = self._params.get(req_id)
        if params is None or params.direction != SEND or req_id in self._send_planned:
            return
        prompt_len = self._prompt_len[req_id]
        if computed_before + scheduled < prompt_len:
            return  # a chunk of a longer prompt; the send goes with the last chunk
        block_ids = list(block_ids_of(req_id))[: blocks_for(prompt_len, self.block_size)]
        self._plan.sends.append(
            SendSpec(
                req_id=req_id,
                params=params,
                block_ids=block_ids,
                num_tokens=prompt_len,
                lease_s=min(params.deadline_s, self.max_lease_s),
            )
        )
        self._send_planned.add(req_id)

    def build_plan(self, scheduler_output: Any, block_ids_of: BlockIdsOf) -> StepPlan:
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            self._plan_send(new.req_id, new.num_computed_tokens, scheduled.get(new.req_id, 0), block_ids_of)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            self._plan_send(req_id, cached.num_computed_tokens[i], scheduled.get(req_id, 0), block_ids_of)
        plan, self._plan = self._plan, StepPlan()
        return plan

    # ------------------------------------------------------------------ end of a request

    def request_finished(self, request: Any) -> tuple[bool, dict[str, Any] | None]:
        req_id = request.request_id
        params = self._params.pop(req_id, None)
        self._prompt_len.pop(req_id, None)
        load_planned = req_id in self._load_planned
        self._load_planned.discard(req_id)
        if params is None:
            return False, None
        if params.direction == RECV:
            if not load_planned:  # ended while queued: nobody will take its KV
                self._plan.withdraw.append(params)
            elif req_id in self._loading:
                # Aborted while its KV was on the way: end the load early. vLLM itself keeps the
                # blocks until the worker reports the load finished.
                self._plan.cancel_recvs.append(req_id)
            return False, None
        # Whatever the finish status: once a send was handed to the worker it may be reading the
        # blocks, so they stay leased until the worker says the send is over.
        leased = req_id in self._send_planned
        self._send_planned.discard(req_id)
        return leased, {"pdorch": {"transfer_id": params.transfer_id, "sent": leased}}
