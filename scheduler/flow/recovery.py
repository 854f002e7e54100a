"""What to do when an attempt fails: the request's failure edges as one pure decision.

- The request's own fault (invalid, too long...), which would fail on any worker: give up.
- On the decode side before its KV landed, through the broker, and not a KV-plane error: another
  decode worker fetches the same transfer from the broker.
- On the decode side before the prefill's first token: hold it until that token comes. If the
  token ends the request (EOS at prefill), nothing failed: the decode side only saw the prefill
  stop sending.
- Anything else (a lost, stalled or failing worker in any phase, a broken handoff): resume from
  the tokens so far on new workers.

Resuming covers every phase the same way: the new attempt's prompt is the request's prompt plus
the tokens already streamed, and its jobs continue at that output index, so the client never sees
a token twice or a token the lost worker would not have produced.

Apart from the request: whether a failure says the KV path between the attempt's two workers is
down (``kv_path_failed``), which backs off that pair, and a worker failing so with two or more
peers as a whole, for every request for a while (``Ledger.kv_handoff_failed``).
"""

from __future__ import annotations

import enum

from scheduler.flow.attempt import Attempt, Failure
from transport.errors import ErrorCode
from transport.messages import KvMode

# The request itself is wrong: it would fail the same way on any worker.
REQUEST_FAULTS = frozenset(
    {ErrorCode.INVALID_REQUEST, ErrorCode.PROMPT_TOO_LONG, ErrorCode.MODEL_NOT_FOUND, ErrorCode.UNAUTHORIZED}
)
# Failures of the KV plane itself: a copy the broker holds is not to be trusted after one.
KV_PLANE_FAULTS = frozenset(
    {
        ErrorCode.KV_CORRUPT,
        ErrorCode.KV_TRUNCATED,
        ErrorCode.KV_TIMEOUT,
        ErrorCode.KV_REJECTED,
        ErrorCode.KV_BUSY,
    }
)
# Decode workers one attempt may try for the same broker transfer before resuming afresh.
MAX_DECODE_TRIES = 3


class Recovery(enum.StrEnum):
    GIVE_UP = "give_up"
    HOLD = "hold"
    NEW_DECODE = "new_decode"
    RESUME = "resume"


def recovery(failure: Failure, attempt: Attempt) -> Recovery:
    if failure.code in REQUEST_FAULTS:
        return Recovery.GIVE_UP
    decode_side = attempt.split and failure.worker_id == attempt.decode and not attempt.kv_loaded
    if decode_side:
        if (
            attempt.kv_mode is KvMode.CENTRALIZED
            and failure.code not in KV_PLANE_FAULTS
            and len(attempt.decode_tried) < MAX_DECODE_TRIES
        ):
            return Recovery.NEW_DECODE
        if not attempt.first_token_in:
            return Recovery.HOLD
    return Recovery.RESUME


def kv_path_failed(failure: Failure, attempt: Attempt) -> bool:
    """A p2p handoff did not land for a reason between its two workers: it stalled with
    neither side saying why, or its sender gave up on it (the receiver not answering, or the
    transfer cut short). A receiver that gave up waiting for its sender points the other way, and
    a worker lost is handled as lost."""
    return (
        attempt.split
        and attempt.kv_mode is KvMode.P2P
        and not attempt.kv_loaded
        and failure.code in (ErrorCode.KV_TIMEOUT, ErrorCode.KV_TRUNCATED)
        and (failure.kind == "stalled" or failure.worker_id == attempt.prefill)
    )
