"""Logprobs, penalties, logit bias and min_tokens in the reference engine's core.

Each changes what the model's logits turn into, so each must hold where the request runs:
disaggregated (prefill draws output token 0, decode the rest) equals colocated, and a resumed
request continues exactly; and each must really do what it says.
"""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from tests.support.reference_core import (
    CFG,
    Request,
    random_prompt,
    run_colocated,
    run_disaggregated,
    token_ids,
)
from transport.messages import SamplingParams
from workers.engines.reference.core import EngineCore
from workers.engines.reference.logprobs import log_softmax
from workers.engines.reference.model import ReferenceModel

FEATURES = {
    "logprobs": {"logprobs": 3},
    "presence": {"presence_penalty": 1.5},
    "frequency": {"frequency_penalty": 0.8},
    "repetition": {"repetition_penalty": 1.3},
    "bias": {"logit_bias": {65: 3.0, 66: -100.0, 300: 5.0}},  # 300: outside the vocabulary, ignored
    "min_tokens": {"min_tokens": 6, "stop_token_ids": [70, 71]},
    "all": {
        "logprobs": 2,
        "presence_penalty": 0.4,
        "frequency_penalty": 0.3,
        "repetition_penalty": 1.1,
        "logit_bias": {97: 1.0},
        "min_tokens": 3,
    },
}


def _requests(feature: dict, seeded: bool) -> dict[str, Request]:
    requests = {}
    for i, length in enumerate([1, 5, 17, 33, 90, 130]):
        sampling = SamplingParams(
            max_tokens=20,
            temperature=0.8 if seeded else 0.0,
            seed=500 + i,
            **feature,
        )
        requests[f"r{i}"] = (random_prompt(length, seed=i), sampling)
    return requests


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
@pytest.mark.parametrize("name", list(FEATURES))
def test_disaggregated_and_resumed_equal_colocated(name: str, seeded: bool) -> None:
    requests = _requests(FEATURES[name], seeded)
    colocated = run_colocated(EngineCore(CFG, num_blocks=1024), requests)
    split = run_disaggregated(EngineCore(CFG, num_blocks=1024), EngineCore(CFG, num_blocks=1024), requests, 7)
    assert token_ids(split) == token_ids(colocated)
    for rid, outs in colocated.items():
        for a, b in zip(outs, split[rid], strict=True):
            assert a.logprobs == b.logprobs
    plain = {
        rid: (p, SamplingParams(max_tokens=20, temperature=s.temperature, seed=s.seed))
        for rid, (p, s) in requests.items()
    }
    if name != "logprobs":  # the feature changes what is drawn
        assert token_ids(colocated) != token_ids(run_colocated(EngineCore(CFG, num_blocks=1024), plain))
    # Resumed after 4 tokens: the rest is the uninterrupted run's (penalties count the 4 as output).
    full = token_ids(colocated)
    long_enough = {rid: r for rid, r in requests.items() if len(full[rid]) > 5}
    resumed = {rid: (p + full[rid][:4], s) for rid, (p, s) in long_enough.items()}
    again = token_ids(
        run_disaggregated(
            EngineCore(CFG, num_blocks=1024),
            EngineCore(CFG, num_blocks=1024),
            resumed,
            5,
            dict.fromkeys(resumed, 4),
        )
    )
    assert again == {rid: full[rid][4:] for rid in resumed}


def test_logprobs_are_the_models_log_softmax_with_the_top_tokens_in_order() -> None:
    prompt = random_prompt(12, seed=3)
    sampling = SamplingParams(max_tokens=1, logprobs=5)
    outs = run_colocated(EngineCore(CFG, num_blocks=64), {"r": (prompt, sampling)})["r"]
    lp = log_softmax(ReferenceModel(CFG).forward_full(prompt)[-1])
    got = outs[0].logprobs
    assert got is not None
    assert got.logprob == pytest.approx(lp[outs[0].token_id], abs=1e-9)
    want = sorted(range(CFG.vocab_size), key=lambda t: (-lp[t], t))[:5]
    assert got.top_ids == want and got.top_ids[0] == outs[0].token_id  # greedy: the most likely
    assert got.top_logprobs == pytest.approx([lp[t] for t in want], abs=1e-9)
    assert np.exp(lp).sum() == pytest.approx(1.0)


def test_a_bias_of_100_forces_a_token_and_min_tokens_holds_back_the_end() -> None:
    prompt = random_prompt(8, seed=4)
    forced = SamplingParams(max_tokens=6, logit_bias={42: 100.0})
    assert token_ids(run_colocated(EngineCore(CFG, num_blocks=64), {"r": (prompt, forced)}))["r"] == [42] * 6
    # EOS as likely as can be: it ends the output at once, unless min_tokens says not yet.
    eos = SamplingParams(max_tokens=10, logit_bias={CFG.eos_token_id: 100.0})
    assert token_ids(run_colocated(EngineCore(CFG, num_blocks=64), {"r": (prompt, eos)}))["r"] == [
        CFG.eos_token_id
    ]
    held = msgspec.structs.replace(eos, min_tokens=4)
    out = token_ids(run_colocated(EngineCore(CFG, num_blocks=64), {"r": (prompt, held)}))["r"]
    assert len(out) == 5 and out[-1] == CFG.eos_token_id and CFG.eos_token_id not in out[:-1]


def test_a_frequency_penalty_breaks_a_greedy_loop() -> None:
    prompt = random_prompt(6, seed=5)
    plain = SamplingParams(max_tokens=40, ignore_eos=True)
    penalized = msgspec.structs.replace(plain, frequency_penalty=2.0)
    loop = token_ids(run_colocated(EngineCore(CFG, num_blocks=64), {"r": (prompt, plain)}))["r"]
    varied = token_ids(run_colocated(EngineCore(CFG, num_blocks=64), {"r": (prompt, penalized)}))["r"]
    assert len(set(varied)) > len(set(loop))


@pytest.mark.parametrize("chunk", [512, 7])
def test_prompt_logprobs_are_every_prompt_tokens_under_the_model_chunked_or_not(chunk: int) -> None:
    prompt = random_prompt(30, seed=6)
    sampling = SamplingParams(max_tokens=2, prompt_logprobs=2)
    core = EngineCore(CFG, num_blocks=64, max_prefill_tokens_per_step=chunk)
    # The same prompt cached first: prompt logprobs must not take positions from the prefix cache.
    run_colocated(core, {"warm": (prompt, SamplingParams(max_tokens=1))})
    first = run_colocated(core, {"r": (prompt, sampling)})["r"][0]
    lp = log_softmax(ReferenceModel(CFG).forward_full(prompt))
    assert first.cached_tokens == 0
    assert first.prompt_logprobs is not None and len(first.prompt_logprobs) == len(prompt) - 1
    for i, got in enumerate(first.prompt_logprobs):
        assert got.logprob == pytest.approx(lp[i][prompt[i + 1]], abs=1e-9)
        assert got.top_ids == sorted(range(CFG.vocab_size), key=lambda t: (-lp[i][t], t))[:2]
