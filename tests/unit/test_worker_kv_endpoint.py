"""Which KV endpoint a worker advertises: only one where KV can arrive, since placement lends a
prefill worker that advertises one to decoding prompts that other workers prefilled."""

from __future__ import annotations

import pytest

from transport.messages import Role
from workers.main import advertised_kv_endpoint

BOUND = "tcp://127.0.0.1:4100"
POD = "tcp://10.0.0.7:5600"


@pytest.mark.parametrize(
    ("role", "advertise", "bound", "expected"),
    [
        (Role.PREFILL, "", BOUND, BOUND),  # the reference and sim engines receive in every role
        (Role.PREFILL, POD, BOUND, POD),  # behind NAT or in a pod: the address others reach
        (Role.DECODE, "", BOUND, BOUND),
        (Role.PREFILL, POD, None, ""),  # vLLM prefill: its connector only sends
        (Role.DECODE, POD, None, POD),  # vLLM decode: its connector receives on that endpoint
        (Role.BOTH, POD, None, POD),
    ],
)
def test_advertised_only_where_kv_can_arrive(
    role: Role, advertise: str, bound: str | None, expected: str
) -> None:
    assert advertised_kv_endpoint(role, advertise, bound) == expected
