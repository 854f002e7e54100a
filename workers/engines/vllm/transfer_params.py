"""What pdorch puts in vLLM's ``kv_transfer_params`` so its connector knows what to move where.

The agent adds it to the HTTP request; vLLM hands it, untouched, to the connector's scheduler side
as ``request.kv_transfer_params``. Transfers are keyed by pdorch's ``transfer_id`` because vLLM
rewrites request ids differently on every instance. Shared by the agent process and the vLLM
processes, so it imports neither vLLM nor torch.
"""

from __future__ import annotations

from typing import Any

import msgspec

from transport.errors import ErrorCode, PdorchError
from transport.messages import KvMode, KvRoute

PARAMS_KEY = "pdorch"
SEND = "send"  # prefill side: push this request's prompt KV along ``route``
RECV = "recv"  # decode side: load this request's prompt KV from ``route`` before decoding


class PdorchKvParams(msgspec.Struct, frozen=True):
    direction: str
    transfer_id: str
    mode: KvMode
    endpoint: str
    deadline_s: float = 60.0
    server_key: str = ""  # the KV server's public key, pinned by the connection (KvRoute.server_key)

    @property
    def route(self) -> KvRoute:
        return KvRoute(self.mode, self.endpoint, self.transfer_id, self.server_key)


def kv_transfer_params(direction: str, route: KvRoute, deadline_s: float) -> dict[str, Any]:
    params = PdorchKvParams(
        direction, route.transfer_id, route.mode, route.endpoint, deadline_s, route.server_key
    )
    return {PARAMS_KEY: msgspec.to_builtins(params)}


def parse_kv_transfer_params(params: dict[str, Any] | None) -> PdorchKvParams | None:
    """pdorch's part of a request's ``kv_transfer_params``; None if the request has none."""
    if not params or PARAMS_KEY not in params:
        return None
    try:
        parsed = msgspec.convert(params[PARAMS_KEY], PdorchKvParams)
    except msgspec.ValidationError as e:
        raise PdorchError(ErrorCode.BAD_MESSAGE, f"bad pdorch kv_transfer_params: {e}") from None
    if parsed.direction not in (SEND, RECV):
        raise PdorchError(ErrorCode.BAD_MESSAGE, f"bad pdorch kv_transfer_params: {parsed}")
    return parsed
