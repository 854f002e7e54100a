"""What pdorch puts in vLLM's ``kv_transfer_params`` so its connector knows what to move where.

The agent adds it to the HTTP request; vLLM hands it, untouched, to the connector's scheduler side
as ``request.kv_transfer_params``. Transfers are keyed by pdorch's ``transfer_id`` because vLLM
rewrites request ids differently on every instance. Shared by the agent process and the vLLM
processes, so it imports neither vLLM nor torch.

A tensor-parallel instance holds each request's KV split across its worker processes (ranks), and
both pools run the same tensor-parallel size: rank r of the prefill instance sends its part to rank
r of the decode instance, as a transfer of its own (:meth:`PdorchKvParams.route_for`). The request's
route names rank 0; rank r's endpoint and transfer id are derived from it the same way on both
sides, so the agent and the scheduler know nothing of ranks.
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

    def route_for(self, rank: int) -> KvRoute:
        """The route of tensor-parallel rank ``rank``'s part of the KV (rank 0: the request's own).
        Rank r > 0 has a transfer of its own (``<transfer_id>/tp<r>``, in the same scope) to the
        decode instance's rank r (p2p: its endpoint, :func:`rank_endpoint`; centralized: through
        the same broker)."""
        if rank == 0:
            return self.route
        # A p2p receiver's route names no endpoint (it is the endpoint): its rank keeps none.
        p2p_sender = self.mode == KvMode.P2P and self.endpoint
        endpoint = rank_endpoint(self.endpoint, rank) if p2p_sender else self.endpoint
        return KvRoute(self.mode, endpoint, f"{self.transfer_id}/tp{rank}", self.server_key)


def rank_endpoint(endpoint: str, rank: int) -> str:
    """Where tensor-parallel rank ``rank`` of a decode instance receives KV, given rank 0's
    endpoint: ``tcp://host:port`` -> ``tcp://host:<port + rank>``, ``ipc://path`` ->
    ``ipc://path.tp<rank>``. Rank 0 binds the endpoint itself, so one rank is the plain layout."""
    if rank == 0:
        return endpoint
    if endpoint.startswith("ipc://"):
        return f"{endpoint}.tp{rank}"
    scheme, sep, rest = endpoint.partition("://")
    host, colon, port = rest.rpartition(":")
    if scheme != "tcp" or not sep or not colon or not port.isdigit() or int(port) == 0:
        raise PdorchError(
            ErrorCode.CONFIG,
            "a tensor-parallel KV endpoint must be tcp://host:port (a fixed port) or ipc://path, "
            f"not {endpoint!r}",
        )
    if int(port) + rank > 65535:
        raise PdorchError(ErrorCode.CONFIG, f"rank {rank}'s KV port past 65535 (from {endpoint!r})")
    return f"tcp://{host}:{int(port) + rank}"


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
