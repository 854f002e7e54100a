"""The engine adapter's translations between pdorch and vLLM's completion API."""

from __future__ import annotations

import pytest

from transport.errors import PdorchError
from transport.messages import FinishReason, KvMode, KvRoute, SamplingParams, TokenLogprobs
from workers.engines.vllm.engine import _event_tokens, sampling_body
from workers.engines.vllm.logprobs import prompt_logprobs
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
    assert not {"stop_token_ids", "top_k", "min_p"} & set(sampling_body(SamplingParams(), 4))
    cut = sampling_body(SamplingParams(top_k=40, min_p=0.05), 4)
    assert (cut["top_k"], cut["min_p"]) == (40, 0.05)
    rich = SamplingParams(
        logprobs=2,
        prompt_logprobs=1,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        repetition_penalty=1.2,
        logit_bias={7: -100.0},
        min_tokens=5,
    )
    body = sampling_body(rich, 8, generated=2)
    assert body["logprobs"] == 2 and body["return_tokens_as_token_ids"] is True
    assert body["prompt_logprobs"] == 1
    assert (body["presence_penalty"], body["frequency_penalty"], body["repetition_penalty"]) == (
        0.5,
        0.25,
        1.2,
    )
    assert body["logit_bias"] == {"7": -100.0}
    assert body["min_tokens"] == 3  # a resumed job: 2 of the 5 are out already
    assert "min_tokens" not in sampling_body(rich, 8, generated=5)


def test_stream_events() -> None:
    assert _event_tokens({"choices": [{"token_ids": [4, 5], "finish_reason": None}]}, -1) == (
        [4, 5],
        None,
        [],
    )
    assert _event_tokens({"choices": [{"token_ids": [6], "finish_reason": "length"}]}, -1) == (
        [6],
        FinishReason.LENGTH,
        [],
    )
    assert _event_tokens({"choices": [{"token_ids": None, "finish_reason": "stop"}]}, -1) == (
        [],
        FinishReason.STOP,
        [],
    )
    assert _event_tokens({"choices": [], "usage": {"completion_tokens": 3}}, -1) == ([], None, [])
    with pytest.raises(PdorchError):
        _event_tokens({"choices": [{"token_ids": [], "finish_reason": "abort"}]}, -1)


def test_vllm_logprobs_are_read_by_token_id() -> None:
    """vLLM's shapes (with return_tokens_as_token_ids): the sampled token is always among the top
    ones; pdorch keeps the k most likely, ordered by logprob then id."""
    event = {
        "choices": [
            {
                "token_ids": [5, 9],
                "finish_reason": None,
                "logprobs": {
                    "tokens": ["token_id:5", "token_id:9"],
                    "token_logprobs": [-0.1, -3.0],
                    "top_logprobs": [
                        {"token_id:5": -0.1, "token_id:2": -2.5},
                        {"token_id:4": -0.5, "token_id:1": -0.5, "token_id:9": -3.0},
                    ],
                },
            }
        ]
    }
    tokens, _, logprobs = _event_tokens(event, 2)
    assert tokens == [5, 9]
    assert logprobs == [
        TokenLogprobs(-0.1, [5, 2], [-0.1, -2.5]),
        TokenLogprobs(-3.0, [1, 4], [-0.5, -0.5]),  # the sampled 9 was not among the top 2
    ]
    choice = {
        "prompt_logprobs": [None, {"8": {"logprob": -1.5, "rank": 3}, "3": {"logprob": -0.2, "rank": 1}}]
    }
    assert prompt_logprobs(choice, [1, 8], 1) == [TokenLogprobs(-1.5, [3], [-0.2])]


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
