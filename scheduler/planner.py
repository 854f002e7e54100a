"""Placement for the live scheduler: a request's features -> predicted output -> placement decision.

The pure placement framework (``scheduler/placement``) decides; this glue feeds it what the
scheduler knows: a cluster snapshot, the prompt's prefix-block hashes, and the output-length
predictor's quantiles. It also keeps reservations in step with a request's growth and teaches the
predictor every finished request's true length.
"""

from __future__ import annotations

from scheduler.cluster import Cluster, WorkerState
from scheduler.placement.config import PlacementConfig, ReservationMode
from scheduler.placement.framework import Placer
from scheduler.placement.kv_budget import blocks_for, predicted_output_tokens, regrow
from scheduler.placement.prefix import prompt_block_hashes
from scheduler.placement.types import ClusterSnapshot, Placement, PlacementRequest
from scheduler.prediction.output_length import OutputFeatures, OutputLengthPredictor
from transport.errors import ErrorCode, PdorchError

# Granularity of the prefix hashes the scheduler keeps per node (tokens per hash).
PREFIX_BLOCK_TOKENS = 16


class Planner:
    def __init__(
        self,
        cluster: Cluster,
        placer: Placer,
        predictor: OutputLengthPredictor,
        *,
        colocated: bool,
    ) -> None:
        self._cluster = cluster
        self.placer = placer
        self.predictor = predictor
        self._colocated = colocated

    @property
    def config(self) -> PlacementConfig:
        return self.placer.config

    def features(
        self, model: str, prompt: list[int], max_tokens: int, tenant: str, hint: int
    ) -> OutputFeatures:
        hashes = prompt_block_hashes(prompt[:PREFIX_BLOCK_TOKENS], PREFIX_BLOCK_TOKENS)
        return OutputFeatures(
            prompt_len=len(prompt),
            max_tokens=max_tokens,
            model=model,
            tenant=tenant,
            template_key=hashes[0] if hashes else 0,
            hint=hint,
        )

    def request(
        self,
        request_id: str,
        features: OutputFeatures,
        prompt: list[int],
        priority: int,
        adapter: str = "",
    ) -> PlacementRequest:
        prediction = self.predictor.predict(features)
        return PlacementRequest(
            request_id=request_id,
            model=features.model,
            prompt_len=len(prompt),
            max_tokens=features.max_tokens,
            tenant=features.tenant,
            priority=priority,
            # An adapter's cached blocks are keyed by its weights, which the scheduler does not
            # know: no prefix match is claimed for it (and none with the base model's blocks).
            block_hashes=() if adapter else prompt_block_hashes(prompt, PREFIX_BLOCK_TOKENS),
            prefix_block_tokens=PREFIX_BLOCK_TOKENS,
            predicted_output_len=round(prediction.mean),
            predicted_output_quantiles=prediction.quantiles,
            colocated=self._colocated,
            adapter=adapter,
        )

    def place(self, preq: PlacementRequest, exclude: frozenset[str] = frozenset()) -> Placement:
        snapshot = self._cluster.snapshot()
        if preq.adapter:
            exclude = exclude | self._cluster.without_adapter(preq.adapter)
        if exclude:
            snapshot = ClusterSnapshot(tuple(n for n in snapshot.nodes if n.worker_id not in exclude))
        return self.placer.place(snapshot, preq)

    def follow(self, preq: PlacementRequest, worker_id: str) -> Placement | None:
        """Colocated on ``worker_id``, which holds the prompt's KV already: the other choices of a
        request with ``n`` > 1 go where the first one's KV landed, to share its prompt blocks
        (placement decided once for all of them). None if that worker is gone or draining."""
        worker = self._cluster.get(worker_id)
        if worker is None or worker.state is not WorkerState.READY:
            return None
        tokens = preq.prompt_len + predicted_output_tokens(preq, self.config.reservation)
        return Placement(worker_id, worker_id, blocks_for(tokens, worker.hello.block_size))

    def has_room(self, preq: PlacementRequest) -> bool:
        """Would the request be placed right now? (Admission lets it in only then.)"""
        try:
            self.place(preq)
        except PdorchError as e:
            if e.code is ErrorCode.NO_WORKER:
                return False
            raise
        return True

    def grow(self, worker_id: str, request_id: str, tokens_so_far: int, max_total_tokens: int) -> None:
        """Re-reserve when a request outgrows its predicted footprint on its decode node."""
        held = self._cluster.held(worker_id, request_id)
        worker = self._cluster.get(worker_id)
        if held is None or worker is None:
            return
        held.tokens = tokens_so_far
        if self.config.reservation.mode is ReservationMode.PREDICTED:
            held.reserved_blocks = regrow(
                held.reserved_blocks,
                tokens_so_far,
                worker.hello.block_size,
                max_total_tokens=max_total_tokens,
                factor=self.config.reservation.regrow_factor,
            )

    def observe(self, features: OutputFeatures, output_len: int) -> None:
        self.predictor.observe(features, output_len)
