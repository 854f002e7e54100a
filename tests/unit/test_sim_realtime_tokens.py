"""The simulated engine's deterministic tokens and finish rules."""

from __future__ import annotations

import numpy as np
import pytest

from transport.errors import ErrorCode, PdorchError
from transport.messages import FinishReason, SamplingParams
from workers.engines.sim.tokens import (
    EOS_TOKEN_ID,
    VOCAB_SIZE,
    SimTokenStream,
    check_prompt,
    check_sampling,
)

PROMPT = [72, 101, 108, 108, 111]


def stream(
    prompt: list[int] = PROMPT,
    sampling: SamplingParams | None = None,
    *,
    engine_seed: int = 0,
    mean: float = 256.0,
    max_model_len: int = 8192,
) -> SimTokenStream:
    return SimTokenStream(
        engine_seed,
        prompt,
        sampling or SamplingParams(max_tokens=1000),
        mean_output_tokens=mean,
        max_model_len=max_model_len,
    )


def tokens(s: SimTokenStream, n: int = 64) -> list[int]:
    return [s.token(i) for i in range(n)]


def test_tokens_are_a_pure_function_of_prompt_and_position() -> None:
    assert tokens(stream()) == tokens(stream())
    assert tokens(stream()) != tokens(stream([*PROMPT, 33]))
    assert tokens(stream()) != tokens(stream(engine_seed=1))
    # Asking out of order changes nothing: there is no hidden RNG state.
    s = stream()
    assert [s.token(i) for i in reversed(range(64))][::-1] == tokens(stream())


def test_greedy_ignores_the_seed_and_sampling_uses_it() -> None:
    greedy = [tokens(stream(sampling=SamplingParams(temperature=0.0, seed=s))) for s in (1, 2)]
    assert greedy[0] == greedy[1]
    sampled = [tokens(stream(sampling=SamplingParams(temperature=0.8, seed=s))) for s in (1, 2)]
    assert sampled[0] != sampled[1]
    assert sampled[0] != greedy[0]


def test_ids_are_printable_bytes_or_eos() -> None:
    ids = tokens(stream(mean=4.0), 4000)
    assert all(32 <= t <= 126 or t == EOS_TOKEN_ID for t in ids)
    assert max(ids) < VOCAB_SIZE
    assert len(set(ids) - {EOS_TOKEN_ID}) == 95  # every printable byte shows up


def test_eos_comes_about_once_per_mean_output_tokens() -> None:
    ids = tokens(stream(mean=10.0), 20000)
    share = ids.count(EOS_TOKEN_ID) / len(ids)
    assert 0.08 < share < 0.12
    assert EOS_TOKEN_ID not in tokens(stream(mean=1e12), 2000)


def test_finish_rules_match_the_reference_engine() -> None:
    s = stream(sampling=SamplingParams(max_tokens=3, stop_token_ids=[65]))
    assert s.finish_reason(EOS_TOKEN_ID, 1) is FinishReason.STOP
    assert s.finish_reason(65, 1) is FinishReason.STOP
    assert s.finish_reason(66, 2) is None
    assert s.finish_reason(66, 3) is FinishReason.LENGTH
    ignoring = stream(sampling=SamplingParams(max_tokens=3, ignore_eos=True))
    assert ignoring.finish_reason(EOS_TOKEN_ID, 1) is None
    near_limit = stream(sampling=SamplingParams(max_tokens=100), max_model_len=len(PROMPT) + 2)
    assert near_limit.finish_reason(66, 1) is None
    assert near_limit.finish_reason(66, 2) is FinishReason.LENGTH


@pytest.mark.parametrize(
    ("prompt", "code"),
    [
        ([], ErrorCode.INVALID_REQUEST),
        ([1, 2, VOCAB_SIZE], ErrorCode.INVALID_REQUEST),
        ([-1], ErrorCode.INVALID_REQUEST),
        ([1, 2**64], ErrorCode.INVALID_REQUEST),  # past int64: refused, not an overflow
        ([1] * 16, ErrorCode.PROMPT_TOO_LONG),
    ],
)
def test_bad_prompts_are_refused(prompt: list[int], code: ErrorCode) -> None:
    with pytest.raises(PdorchError) as e:
        check_prompt(prompt, max_model_len=16)
    assert e.value.code is code
    ids = check_prompt([1] * 14 + [VOCAB_SIZE - 1], max_model_len=16)
    assert ids.dtype == np.int64 and ids.tolist() == [1] * 14 + [VOCAB_SIZE - 1]


@pytest.mark.parametrize(
    "sampling",
    [SamplingParams(max_tokens=0), SamplingParams(temperature=-1.0), SamplingParams(top_p=0.0)],
)
def test_bad_sampling_is_refused(sampling: SamplingParams) -> None:
    with pytest.raises(PdorchError) as e:
        check_sampling(sampling)
    assert e.value.code is ErrorCode.INVALID_REQUEST


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_resumed_stream_continues_where_the_uninterrupted_one_was(temperature: float) -> None:
    sampling = SamplingParams(max_tokens=40, temperature=temperature, seed=3, ignore_eos=True)
    full = stream(sampling=sampling, max_model_len=len(PROMPT) + 30)
    want = tokens(full, 30)
    cut = 7
    resumed = SimTokenStream(
        0,
        PROMPT + want[:cut],
        sampling,
        mean_output_tokens=256.0,
        max_model_len=len(PROMPT) + 30,
        generated=cut,
    )
    assert tokens(resumed, 30 - cut) == want[cut:]
    # The finish rules count the whole output and the whole context: max_model_len ends it where
    # the uninterrupted run would have ended.
    assert resumed.finish_reason(want[29], 30 - cut) is FinishReason.LENGTH
    assert resumed.finish_reason(want[28], 29 - cut) is None
    with pytest.raises(PdorchError):
        check_prompt(PROMPT, 8192, generated=len(PROMPT))


def test_what_a_model_without_logits_cannot_honour_is_refused_and_min_tokens_holds() -> None:
    for asked in (
        {"logprobs": 0},
        {"prompt_logprobs": 1},
        {"frequency_penalty": 0.5},
        {"logit_bias": {1: 2.0}},
        {"top_k": 5},
        {"min_p": 0.1},
    ):
        with pytest.raises(PdorchError) as e:
            check_sampling(SamplingParams(**asked))  # type: ignore[arg-type]
        assert e.value.code is ErrorCode.INVALID_REQUEST
    # EOS every other token on average: min_tokens keeps it (and the stop ids) back until then.
    eager = stream(sampling=SamplingParams(max_tokens=50, min_tokens=10, stop_token_ids=[65, 66]), mean=2.0)
    first = tokens(eager, 10)
    assert EOS_TOKEN_ID not in first and not {65, 66} & set(first)
    assert EOS_TOKEN_ID in tokens(eager, 50)[10:]


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(max_tokens=300),
        SamplingParams(max_tokens=300, temperature=0.8, seed=4, stop_token_ids=[65, 66]),
        SamplingParams(max_tokens=40, min_tokens=20, stop_token_ids=[70, 71, 72]),
        SamplingParams(max_tokens=500, ignore_eos=True),
        # A long run whose last chunk is short.
        SamplingParams(max_tokens=80, ignore_eos=True),
        # Short runs, drawn token by token.
        SamplingParams(max_tokens=16, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0.8, seed=2, stop_token_ids=[65, 66, 67, 68, 69]),
    ],
)
@pytest.mark.parametrize("generated", [0, 3])
def test_a_run_of_tokens_at_once_equals_token_by_token(sampling: SamplingParams, generated: int) -> None:
    s = SimTokenStream(
        7, [*PROMPT, 1, 2, 3], sampling, mean_output_tokens=30.0, max_model_len=200, generated=generated
    )
    assert s.tokens(5, 400).tolist() == [s.token(i) for i in range(5, 405)]
    for done in (1, 4):
        expected, n = [], done
        while True:  # step as a batcher does: one token, then the finish rules
            token = s.token(n)
            n += 1
            expected.append(token)
            reason = s.finish_reason(token, n)
            if reason is not None:
                break
        assert s.rest(done) == (expected, reason)
