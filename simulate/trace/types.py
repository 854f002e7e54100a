"""A workload trace: requests with arrival times and lengths, whatever file they came from."""

from __future__ import annotations

import msgspec

from transport.errors import ErrorCode, PdorchError

# No public trace records max_tokens; every request is given this (above every output in them),
# which the output-length predictor may use as a feature and a cap.
DEFAULT_MAX_TOKENS = 4096


class TraceRequest(msgspec.Struct, frozen=True, gc=False):
    arrival_s: float
    prompt_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()  # chained prefix-block ids (equal id = equal whole prefix)
    tenant: str = ""
    max_tokens: int = DEFAULT_MAX_TOKENS
    adapter: str = ""  # the LoRA adapter it runs with ("" = the base model); see simulate/adapters.py


class Trace(msgspec.Struct, frozen=True):
    name: str
    requests: tuple[TraceRequest, ...]
    prefix_block_tokens: int = 16  # tokens covered by one hash id

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s - self.requests[0].arrival_s if self.requests else 0.0

    def head(self, n: int) -> Trace:
        return Trace(self.name, self.requests[:n], self.prefix_block_tokens)

    def scaled(self, rate_scale: float) -> Trace:
        """The same requests arriving ``rate_scale`` times as fast (timestamps divided by it)."""
        if not rate_scale > 0:
            raise PdorchError(ErrorCode.CONFIG, f"rate scale must be > 0, got {rate_scale}")
        reqs = tuple(msgspec.structs.replace(r, arrival_s=r.arrival_s / rate_scale) for r in self.requests)
        return Trace(self.name, reqs, self.prefix_block_tokens)


def normalised(name: str, rows: list[TraceRequest], prefix_block_tokens: int) -> Trace:
    """Sorted by arrival, the first at 0."""
    if not rows:
        raise PdorchError(ErrorCode.CONFIG, f"trace {name} is empty")
    rows.sort(key=lambda r: r.arrival_s)
    t0 = rows[0].arrival_s
    reqs = tuple(msgspec.structs.replace(r, arrival_s=r.arrival_s - t0) for r in rows)
    return Trace(name, reqs, prefix_block_tokens)
