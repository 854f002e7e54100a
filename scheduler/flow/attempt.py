"""One attempt at a request: the jobs placed for what is left of it, and how far they got.

A request starts with one attempt. When a worker it depends on dies, stalls or fails it, the
request moves on to a new attempt (``recovery.py`` decides how), which resumes from the tokens
already produced: its jobs carry ``generated`` = that many, so the engines continue exactly where
the lost worker would have. Each attempt has its own job id, so whatever the abandoned one's
workers still send is dropped by the inbox, never mistaken for the current attempt's output.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from transport.errors import ErrorCode
from transport.messages import KvMode, TokenOutput


class Phase(enum.StrEnum):
    PREFILL = "prefill"  # waiting for the attempt's first token
    HANDOFF = "handoff"  # first token in; the KV is on its way to the decode worker
    DECODE = "decode"  # the decode side (or the one colocated worker) generates the rest


@dataclass(frozen=True)
class Failure:
    """Why an attempt cannot go on. ``worker_id`` is whom it is blamed on ("" = the KV handoff)."""

    worker_id: str
    code: ErrorCode
    message: str
    kind: str  # "lost" (dropped by the cluster), "stalled" (no progress in time) or "error" (JobError)

    @property
    def worker_gone(self) -> bool:
        """The worker cannot have done anything more for the request (it is not just slow)."""
        return self.kind == "lost"


@dataclass
class Attempt:
    number: int  # 0 for the request's first attempt
    job_id: str
    prefill: str  # computes the attempt's first token (the only worker when colocated)
    decode: str  # generates the rest; == prefill when colocated or when no decode is needed
    generated: int  # the request's tokens when the attempt started (its jobs' ``generated``)
    started_at: float
    kv_mode: KvMode | None = None  # the handoff's route; None without a handoff
    transfer_id: str = ""
    first_token_in: bool = False
    kv_loaded: bool = False
    # Workers that may still hold state for the job (they get Cancel if the attempt is dropped).
    open: set[str] = field(default_factory=set)
    # Decode workers this attempt has used (a centralized handoff may move to another one).
    decode_tried: set[str] = field(default_factory=set)
    # A decode-side failure that waits for the prefill's first token: if that token ends the
    # request (EOS at prefill), the decode side's "prefill stopped sending" is no failure at all.
    held: Failure | None = None
    # Decode's tokens that came before the prefill's first token (when only the prefill's message
    # may carry it: the client asked for logprobs); they follow it.
    early: list[TokenOutput] = field(default_factory=list)

    @property
    def split(self) -> bool:
        return self.prefill != self.decode

    @property
    def phase(self) -> Phase:
        if not self.first_token_in:
            return Phase.PREFILL
        if self.split and not self.kv_loaded:
            return Phase.HANDOFF
        return Phase.DECODE

    def progress_worker(self) -> str:
        """The worker the attempt waits for now. In the handoff that is the decode worker: it is
        the one that has not confirmed the KV (the prefill's part may be what is stuck, but a
        request moved off the decode worker moves off the prefill worker too)."""
        return self.prefill if self.phase is Phase.PREFILL else self.decode
