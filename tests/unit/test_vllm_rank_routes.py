"""Where each tensor-parallel rank's part of a request's KV goes: derived from the request's route
(rank 0's) the same way on the sending and the receiving instance."""

from __future__ import annotations

import pytest

from transport.errors import ErrorCode, PdorchError
from transport.messages import KvMode
from workers.engines.vllm.transfer_params import PdorchKvParams, rank_endpoint


def _params(mode: KvMode, endpoint: str) -> PdorchKvParams:
    return PdorchKvParams("send", "prefill-0/abc", mode, endpoint, 30.0, "key")


def test_rank_zero_is_the_request_route_itself() -> None:
    params = _params(KvMode.P2P, "tcp://10.0.0.7:5601")
    assert params.route_for(0) == params.route
    assert rank_endpoint("tcp://10.0.0.7:5601", 0) == "tcp://10.0.0.7:5601"


def test_p2p_ranks_go_to_their_own_endpoint_with_a_transfer_of_their_own() -> None:
    params = _params(KvMode.P2P, "tcp://10.0.0.7:5601")
    routes = [params.route_for(r) for r in range(4)]
    assert [r.endpoint for r in routes] == [f"tcp://10.0.0.7:{5601 + r}" for r in range(4)]
    assert [r.transfer_id for r in routes] == ["prefill-0/abc"] + [f"prefill-0/abc/tp{r}" for r in (1, 2, 3)]
    # Still in the sender's scope (the receiver admits only ids under the peer's key name).
    assert all(r.transfer_id.startswith("prefill-0/") for r in routes)
    assert {r.server_key for r in routes} == {"key"} and {r.mode for r in routes} == {KvMode.P2P}


def test_a_p2p_receivers_ranks_name_no_endpoint_either() -> None:
    """The scheduler gives the decode side of a p2p handoff a route without an endpoint (it is the
    endpoint): its ranks' routes differ by transfer id alone."""
    params = PdorchKvParams("recv", "prefill-0/abc", KvMode.P2P, "", 30.0)
    assert params.route_for(1).endpoint == ""
    assert params.route_for(1).transfer_id == "prefill-0/abc/tp1"


def test_centralized_ranks_share_the_broker_under_transfers_of_their_own() -> None:
    params = _params(KvMode.CENTRALIZED, "tcp://broker:5700")
    assert params.route_for(3).endpoint == "tcp://broker:5700"
    assert params.route_for(3).transfer_id == "prefill-0/abc/tp3"


def test_ipc_and_wildcard_endpoints() -> None:
    assert rank_endpoint("ipc:///run/kv", 2) == "ipc:///run/kv.tp2"
    assert rank_endpoint("tcp://*:5601", 1) == "tcp://*:5602"
    assert rank_endpoint("tcp://[::1]:5601", 1) == "tcp://[::1]:5602"


@pytest.mark.parametrize(
    "endpoint", ["tcp://127.0.0.1:0", "tcp://127.0.0.1", "tcp://127.0.0.1:x", "inproc://kv", "tcp://h:65535"]
)
def test_endpoints_a_rank_cannot_be_derived_from_are_config_errors(endpoint: str) -> None:
    with pytest.raises(PdorchError) as e:
        rank_endpoint(endpoint, 1)
    assert e.value.code is ErrorCode.CONFIG
