"""``PdorchConnector``: a vLLM v1 KV connector that moves whole KV blocks over pdorch's KV plane.

Load it into a vLLM server with::

    --kv-transfer-config '{"kv_connector": "PdorchConnector",
        "kv_connector_module_path": "workers.engines.vllm.connector",
        "kv_role": "kv_producer" | "kv_consumer" | "kv_both",
        "kv_load_failure_policy": "fail" | "recompute",
        "kv_connector_extra_config": {"pdorch_kv_bind": "tcp://127.0.0.1:5601",
                                      "pdorch_max_lease_s": 120,
                                      "pdorch_kv_same_host": "auto" | "on" | "off",
                                      "pdorch_kv_arrival_notes": "tcp://127.0.0.1:5602",
                                      "pdorch_kv_limits": {"max_active": 8, ...}}}'

vLLM builds one instance per process: role SCHEDULER in the EngineCore (bookkeeping, see
``connector_scheduler.py``) and role WORKER next to the model (data movement, see
``connector_worker.py``). They talk only through the per-step metadata built here. This is the
only module of pdorch that imports vLLM or torch; nothing else imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)
from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
from vllm.logger import init_logger

from transport.kv.receiver import ReceiverLimits
from transport.kv.same_host import SameHostMode
from transport.security import config as security_config
from workers.engines.vllm.connector_metadata import StepPlan
from workers.engines.vllm.connector_scheduler import PdorchSchedulerSide
from workers.engines.vllm.connector_worker import PdorchWorkerSide, check_layout

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = init_logger(__name__)

DEFAULT_MAX_LEASE_S = 120.0


@dataclass
class PdorchConnectorMetadata(KVConnectorMetadata):
    plan: StepPlan = field(default_factory=StepPlan)


class PdorchConnector(KVConnectorBase_V1):
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        parallel = vllm_config.parallel_config
        check_layout(  # any tensor-parallel size
            pipeline=parallel.pipeline_parallel_size,
            context=parallel.prefill_context_parallel_size * parallel.decode_context_parallel_size,
            data=parallel.data_parallel_size,
            nodes=parallel.nnodes,
        )
        transfer = self._kv_transfer_config
        block_size = vllm_config.cache_config.block_size
        max_lease_s = float(transfer.get_from_extra_config("pdorch_max_lease_s", DEFAULT_MAX_LEASE_S))
        self._scheduler: PdorchSchedulerSide | None = None
        self._worker: PdorchWorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = PdorchSchedulerSide(block_size, max_lease_s)
        else:
            bind = transfer.get_from_extra_config("pdorch_kv_bind", "") if transfer.is_kv_consumer else ""
            if transfer.is_kv_consumer and not bind:
                raise ValueError("a consuming PdorchConnector needs kv_connector_extra_config.pdorch_kv_bind")
            # The agent's launcher gives this vLLM server the worker's keys through the environment.
            security = security_config.build(security_config.from_env())
            same_host = SameHostMode(transfer.get_from_extra_config("pdorch_kv_same_host", "auto"))
            limits = msgspec.convert(transfer.get_from_extra_config("pdorch_kv_limits", {}), ReceiverLimits)
            # The agent's endpoint for "this load's KV is arriving" (kv_arrivals.py).
            notes = str(transfer.get_from_extra_config("pdorch_kv_arrival_notes", "")) if bind else ""
            self._worker = PdorchWorkerSide(
                bind=bind or None,
                security=security,
                same_host=same_host,
                limits=limits,
                arrival_notes=notes,
                rank=get_tensor_model_parallel_rank(),
            )
        logger.info("PdorchConnector %s side, role %s", role.name, transfer.kv_role)

    def _plan(self) -> StepPlan:
        meta = self._get_connector_metadata()
        assert isinstance(meta, PdorchConnectorMetadata)
        return meta.plan

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None
        self._worker.start_load_kv(self._plan())

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Loads are asynchronous: vLLM schedules a request only after its load finished.
        return

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        assert self._worker is not None
        self._worker.save_kv_layer(self._plan(), layer_name)

    def wait_for_save(self) -> None:
        assert self._worker is not None
        if self.has_connector_metadata():
            self._worker.wait_for_save(self._plan())

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        assert self._worker is not None
        sending, recving, failed = self._worker.get_transfer_results(finished_req_ids)
        return KVConnectorTransferResults(
            finished_sending=sending, finished_recving=recving, failed_recving=failed
        )

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()

    # ------------------------------------------------------------------ scheduler side

    def on_new_request(self, request: Request) -> None:
        assert self._scheduler is not None
        self._scheduler.on_new_request(request)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None and self._kv_cache_manager is not None
        manager = self._kv_cache_manager
        plan = self._scheduler.build_plan(scheduler_output, lambda req_id: manager.get_block_ids(req_id)[0])
        return PdorchConnectorMetadata(plan=plan)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        assert self._scheduler is not None
        self._scheduler.update_connector_output(connector_output.finished_recving)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.request_finished(request)

    def get_loaded_kv_cache_group_ids(self, request: Request) -> tuple[int, ...]:
        # A load restores the request's own blocks in every group (one group for these models).
        return tuple(range(len(self._kv_cache_config.kv_cache_groups)))
