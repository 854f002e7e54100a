"""Greedy and seeded sampling: nucleus (top-p), top-k and min-p."""

from __future__ import annotations

import numpy as np
import pytest

from transport.errors import ErrorCode, PdorchError
from transport.messages import SamplingParams
from workers.engines.reference.sampler import nucleus_probabilities, sample, validate_sampling

LOGITS = np.random.default_rng(0).standard_normal(260) * 2.0


def _logits_for(probs: list[float]) -> np.ndarray:
    return np.log(np.asarray(probs))


@pytest.mark.parametrize(
    ("logits", "expected"),
    [
        ([0.0, 1.0, 3.0, 3.0, -1.0], 2),  # tie: lowest id wins
        ([5.0, 5.0, 5.0], 0),
        ([-3.0, -2.0, -1.0], 2),
    ],
)
def test_greedy_is_argmax_with_lowest_id_on_ties(logits: list[float], expected: int) -> None:
    for index in (0, 1, 17):
        assert sample(np.asarray(logits), SamplingParams(temperature=0.0, seed=index), index) == expected


@pytest.mark.parametrize(
    ("probs", "top_p", "kept"),
    [
        ([0.5, 0.3, 0.15, 0.05], 0.4, {0}),
        ([0.5, 0.3, 0.15, 0.05], 0.75, {0, 1}),
        ([0.5, 0.3, 0.15, 0.05], 0.85, {0, 1, 2}),
        ([0.5, 0.3, 0.15, 0.05], 1.0, {0, 1, 2, 3}),
        ([0.05, 0.15, 0.3, 0.5], 0.75, {3, 2}),
        ([0.25, 0.25, 0.25, 0.25], 0.45, {0, 1}),  # equal mass: lowest ids first
        ([0.1, 0.3, 0.3, 0.3], 0.5, {1, 2}),
    ],
)
def test_nucleus_is_the_smallest_set_reaching_top_p(probs: list[float], top_p: float, kept: set[int]) -> None:
    nucleus = nucleus_probabilities(_logits_for(probs), 1.0, top_p)
    assert set(np.flatnonzero(nucleus).tolist()) == kept
    assert nucleus.sum() == pytest.approx(1.0)
    # Inside the nucleus the relative odds are unchanged.
    kept_ids = sorted(kept)
    expected = np.asarray(probs)[kept_ids] / np.asarray(probs)[kept_ids].sum()
    np.testing.assert_allclose(nucleus[kept_ids], expected)


@pytest.mark.parametrize(
    ("probs", "top_k", "min_p", "top_p", "kept"),
    [
        ([0.5, 0.3, 0.15, 0.05], 2, 0.0, 1.0, {0, 1}),
        ([0.5, 0.3, 0.15, 0.05], 4, 0.0, 1.0, {0, 1, 2, 3}),
        ([0.25, 0.25, 0.25, 0.25], 3, 0.0, 1.0, {0, 1, 2}),  # equal: lowest ids first
        ([0.5, 0.3, 0.15, 0.05], 0, 0.2, 1.0, {0, 1, 2}),  # at least 0.2 x 0.5
        ([0.5, 0.3, 0.15, 0.05], 0, 0.7, 1.0, {0}),
        # top-p of what the cuts left: 0.5 and 0.3 of 0.8 are 0.625 and 1.0
        ([0.5, 0.3, 0.15, 0.05], 2, 0.0, 0.6, {0}),
        ([0.5, 0.3, 0.15, 0.05], 2, 0.0, 0.7, {0, 1}),
        ([0.5, 0.3, 0.15, 0.05], 3, 0.2, 0.9, {0, 1, 2}),
    ],
)
def test_top_k_and_min_p_cut_before_the_nucleus(
    probs: list[float], top_k: int, min_p: float, top_p: float, kept: set[int]
) -> None:
    cut = nucleus_probabilities(_logits_for(probs), 1.0, top_p, top_k, min_p)
    assert set(np.flatnonzero(cut).tolist()) == kept
    kept_ids = sorted(kept)
    expected = np.asarray(probs)[kept_ids] / np.asarray(probs)[kept_ids].sum()
    np.testing.assert_allclose(cut[kept_ids], expected)


def test_top_k_of_one_is_greedy_whatever_the_temperature() -> None:
    greedy = sample(LOGITS, SamplingParams(temperature=0.0), 0)
    params = SamplingParams(temperature=1.5, top_k=1, seed=9)
    assert {sample(LOGITS, params, i) for i in range(50)} == {greedy}


def test_sampling_only_draws_from_the_nucleus() -> None:
    params = SamplingParams(temperature=1.0, top_p=0.6, seed=3)
    nucleus = set(np.flatnonzero(nucleus_probabilities(LOGITS, 1.0, 0.6)).tolist())
    drawn = {sample(LOGITS, params, i) for i in range(500)}
    assert drawn <= nucleus
    assert len(drawn) > 1


def test_seeded_sampling_is_reproducible_and_stateless() -> None:
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=1234)
    first = [sample(LOGITS, params, i) for i in range(100)]
    assert first == [sample(LOGITS, params, i) for i in range(100)]
    # No hidden RNG state: index 57 alone gives what it gave in sequence.
    assert sample(LOGITS, params, 57) == first[57]


def test_tokens_depend_on_seed_and_index() -> None:
    by_index = [sample(LOGITS, SamplingParams(temperature=1.0, seed=7), i) for i in range(100)]
    by_seed = [sample(LOGITS, SamplingParams(temperature=1.0, seed=s), 0) for s in range(100)]
    assert len(set(by_index)) > 10
    assert len(set(by_seed)) > 10
    other_seed = [sample(LOGITS, SamplingParams(temperature=1.0, seed=8), i) for i in range(100)]
    assert other_seed != by_index


def test_draws_follow_the_distribution() -> None:
    probs = [0.6, 0.25, 0.1, 0.05]
    params = SamplingParams(temperature=1.0, seed=42)
    counts = np.bincount([sample(_logits_for(probs), params, i) for i in range(4000)], minlength=4)
    np.testing.assert_allclose(counts / 4000, probs, atol=0.03)


def test_temperature_sharpens_and_flattens() -> None:
    logits = _logits_for([0.4, 0.3, 0.2, 0.1])
    cold = nucleus_probabilities(logits, 0.05, 1.0)
    hot = nucleus_probabilities(logits, 100.0, 1.0)
    assert cold[0] > 0.99
    np.testing.assert_allclose(hot, 0.25, atol=0.01)
    # A vanishing temperature is greedy, not NaN.
    tiny = nucleus_probabilities(logits, 1e-300, 1.0)
    np.testing.assert_array_equal(tiny, [1.0, 0.0, 0.0, 0.0])
    assert sample(logits, SamplingParams(temperature=1e-300, seed=1), 3) == 0


def test_negative_seed_is_accepted() -> None:
    params = SamplingParams(temperature=1.0, seed=-1)
    assert sample(LOGITS, params, 0) == sample(LOGITS, params, 0)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=0),
        SamplingParams(temperature=-0.1),
        SamplingParams(temperature=float("nan")),
        SamplingParams(top_p=0.0),
        SamplingParams(top_p=1.5),
        SamplingParams(top_k=-1),
        SamplingParams(min_p=1.5),
        SamplingParams(min_p=-0.1),
    ],
)
def test_invalid_params_are_refused(params: SamplingParams) -> None:
    with pytest.raises(PdorchError) as caught:
        validate_sampling(params)
    assert caught.value.code is ErrorCode.INVALID_REQUEST


def test_valid_params_pass() -> None:
    validate_sampling(SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0))
    validate_sampling(SamplingParams(temperature=2.0, top_p=0.01))
