"""Admission limits and fairness weights (nested in the scheduler config under ``admission:``)."""

from __future__ import annotations

import enum
import math

import msgspec

from transport.errors import ErrorCode, PdorchError


class QueueOrder(enum.StrEnum):
    FIFO = "fifo"  # within a tenant: first come, first served
    DEADLINE = "deadline"  # within a tenant: earliest deadline first


class AdmissionPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_queued: int = 1024
    max_queued_per_tenant: int = 0  # 0 = only the global bound
    # Share of service per tenant (API key) relative to others; unknown tenants get default_weight.
    tenant_weights: dict[str, float] = {}
    default_weight: float = 1.0
    # Admitted sequences in flight at once, a request's ``n`` choices counting ``n`` (0 = unbounded;
    # the room check alone decides).
    max_inflight: int = 0
    order: QueueOrder = QueueOrder.FIFO
    retry_after_min_s: float = 1.0
    retry_after_max_s: float = 60.0

    def validate(self) -> None:
        problems = []
        if self.max_queued < 0 or self.max_queued_per_tenant < 0 or self.max_inflight < 0:
            problems.append("max_queued, max_queued_per_tenant and max_inflight must be >= 0")
        for tenant, w in {**self.tenant_weights, "(default)": self.default_weight}.items():
            if not (math.isfinite(w) and w > 0):
                problems.append(f"weight of tenant {tenant!r} must be > 0, got {w}")
        if not 0 <= self.retry_after_min_s <= self.retry_after_max_s:
            problems.append("need 0 <= retry_after_min_s <= retry_after_max_s")
        if problems:
            raise PdorchError(ErrorCode.CONFIG, "admission: " + "; ".join(problems))

    def weight(self, tenant: str) -> float:
        return self.tenant_weights.get(tenant, self.default_weight)
