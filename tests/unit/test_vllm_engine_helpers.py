"""The engine adapter's translations between pdorch and vLLM's completion API."""

from __future__ import annotations

import pytest

from transport.errors import PdorchError
from transport.messages import FinishReason, KvMode, KvRoute, SamplingParams
from workers.engines.vllm.engine import _event_tokens, sampling_body
from workers.engines.vllm.transfer_params import RECV, SEND, kv_transfer_params, parse_kv_transfer_params


def test_sampling_maps_to_vllm_fields() -> None:
    s = SamplingParams(max_tokens=9, temperature=0.7, top_p=0.9, seed=5, stop_token_ids=[3], ignore_eos=True)
    body = sampling_body(s, 1)
    assert body == {
        "max_tokens": 1,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 5,
        "ignore_eos": True,
        "return_token_ids": True,
        "stop_token_ids": [3],
    }
    assert "stop_token_ids" not in sampling_body(SamplingParams(), 4)


def test_stream_events() -> None:
    assert _event_tokens({"choices": [{"token_ids": [4, 5], "finish_reason": None}]}) == ([4, 5], None)
    assert _event_tokens({"choices": [{"token_ids": [6], "finish_reason": "length"}]}) == (
        [6],
        FinishReason.LENGTH,
    )
    assert _event_tokens({"choices": [{"token_ids": None, "finish_reason": "stop"}]}) == (
        [],
        FinishReason.STOP,
    )
    assert _event_tokens({"choices": [], "usage": {"completion_tokens": 3}}) == ([], None)
    with pytest.raises(PdorchError):
        _event_tokens({"choices": [{"token_ids": [], "finish_reason": "abort"}]})


def test_transfer_params_round_trip_and_validation() -> None:
    params = kv_transfer_params(SEND, KvRoute(KvMode.CENTRALIZED, "tcp://broker:1", "t9"), 12.5)
    parsed = parse_kv_transfer_params(params)
    assert parsed is not None
    assert (parsed.direction, parsed.transfer_id, parsed.mode, parsed.deadline_s) == (
        SEND,
        "t9",
        "centralized",
        12.5,
    )
    assert parsed.route == KvRoute(KvMode.CENTRALIZED, "tcp://broker:1", "t9")
    assert parse_kv_transfer_params(None) is None
    assert parse_kv_transfer_params({"do_remote_decode": True}) is None
    bad = kv_transfer_params(RECV, KvRoute("carrier-pigeon", "x", "t"), 1.0)
    with pytest.raises(PdorchError):
        parse_kv_transfer_params(bad)
    with pytest.raises(PdorchError):
        parse_kv_transfer_params({"pdorch": {"direction": RECV}})
