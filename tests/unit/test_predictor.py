"""The online output-length predictor."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler.prediction.output_length import OutputFeatures, OutputLengthPredictor, PredictorConfig
from simulate.predictor_eval import evaluate, rankdata, spearman
from simulate.synthetic import synthetic_trace
from transport.errors import ErrorCode, PdorchError


def feats(**kw: object) -> OutputFeatures:
    kw.setdefault("prompt_len", 1000)
    kw.setdefault("max_tokens", 4096)
    kw.setdefault("model", "m")
    return OutputFeatures(**kw)  # type: ignore[arg-type]


def test_learns_per_template_distributions() -> None:
    p = OutputLengthPredictor()
    rng = np.random.default_rng(0)
    for _ in range(300):
        p.observe(feats(template_key=1), int(rng.integers(18, 23)))
        p.observe(feats(template_key=2), int(rng.integers(380, 420)))
    short, long = p.predict(feats(template_key=1)), p.predict(feats(template_key=2))
    assert 15 <= short.quantile(0.5) <= 25
    assert 340 <= long.quantile(0.5) <= 460
    # An unseen template starts from what is known about everything (between the two).
    unseen = p.predict(feats(template_key=3)).quantile(0.5)
    assert 20 < unseen < 420


def test_quantiles_ascend_and_respect_max_tokens() -> None:
    p = OutputLengthPredictor()
    for n in (5, 50, 500, 5000, 700, 70):
        p.observe(feats(), n)
    pred = p.predict(feats(max_tokens=600))
    values = [v for _, v in pred.quantiles]
    assert values == sorted(values)
    assert max(values) <= 600
    assert [q for q, _ in pred.quantiles] == list(PredictorConfig().levels)
    assert 0 < pred.mean <= 600


def test_without_data_it_falls_back_on_the_hint_or_max_tokens() -> None:
    p = OutputLengthPredictor()
    assert 90 <= p.predict(feats(max_tokens=100)).quantile(0.5) <= 100
    assert 280 <= p.predict(feats(hint=300)).quantile(0.5) <= 330


def test_learns_how_far_to_trust_client_hints() -> None:
    p = OutputLengthPredictor()
    for _ in range(200):  # this client's hints are 10x too high
        p.observe(feats(hint=1000), 100)
    assert 80 <= p.predict(feats(hint=1000)).quantile(0.5) <= 125


def test_decay_follows_a_shift() -> None:
    p = OutputLengthPredictor(PredictorConfig(decay=0.95))
    for _ in range(200):
        p.observe(feats(), 20)
    for _ in range(200):
        p.observe(feats(), 500)
    assert p.predict(feats()).quantile(0.5) > 400


def test_bounded_memory() -> None:
    p = OutputLengthPredictor(PredictorConfig(max_keys=50))
    for i in range(500):
        p.observe(feats(template_key=i + 1, tenant=f"t{i}"), 10)
    assert len(p._hists) <= 50


@pytest.mark.parametrize(
    "config",
    [
        PredictorConfig(levels=(0.9, 0.5)),
        PredictorConfig(levels=(0.5, 1.0)),
        PredictorConfig(levels=()),
        PredictorConfig(decay=0.0),
        PredictorConfig(prior_strength=0.0),
        PredictorConfig(max_keys=1),
    ],
)
def test_bad_config(config: PredictorConfig) -> None:
    with pytest.raises(PdorchError) as info:
        OutputLengthPredictor(config)
    assert info.value.code is ErrorCode.CONFIG


def test_ranks_and_spearman() -> None:
    assert rankdata(np.array([10.0, 30.0, 20.0, 20.0])).tolist() == [1.0, 4.0, 2.5, 2.5]
    assert spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1])) == pytest.approx(-1.0)
    assert spearman(np.array([1, 1, 1]), np.array([1, 2, 3])) == 0.0


def test_online_evaluation_beats_the_naive_baselines_on_templated_traffic() -> None:
    report = evaluate(synthetic_trace(1500, seed=3))
    ours, mean, max_tokens = report.scores
    assert ours.mae < mean.mae < max_tokens.mae
    assert ours.spearman > 0.5 > mean.spearman
    assert 0.8 <= report.coverage_p90 <= 0.98


def test_the_blended_distribution_is_each_histogram_blended_into_the_broader_ones_in_turn() -> None:
    """From the broadest key to the most specific, ``p = (counts + s * p) / (n + s)`` (a hint's
    point mass blended in with ``hint_strength`` before hints of its size are known): computed
    here step by step, against the predictor's one weighted sum."""
    rng = np.random.default_rng(4)
    cfg = PredictorConfig()
    p = OutputLengthPredictor(cfg)
    seen = [
        feats(
            prompt_len=int(rng.integers(1, 5000)),
            tenant=str(rng.integers(3)),
            template_key=int(rng.integers(4)),
        )
        for _ in range(300)
    ]
    for f in seen:
        p.observe(f, int(rng.integers(1, 3000)))
    p.observe(feats(hint=64), 70)  # hints of one size seen once; others never
    for f in [*seen[:40], feats(hint=64), feats(hint=900, tenant="1"), feats(model="new")]:
        want = None
        for key in p._keys(f):
            if key[0] == "mh" and want is not None:
                point = np.zeros(p._bins)
                point[key[2]] = 1.0
                want = (cfg.hint_strength * point + cfg.prior_strength * want) / (
                    cfg.hint_strength + cfg.prior_strength
                )
            h = p._hists.get(key)
            if h is not None and h.n > 0:
                s = cfg.prior_strength
                want = h.counts / h.n if want is None else (h.counts + s * want) / (h.n + s)
        assert want is not None
        assert p._distribution(f) == pytest.approx(want, abs=1e-12)


def test_decayed_counts_stay_exact_through_thousands_of_observations() -> None:
    """Counts decay by a scale factor rather than bin by bin; the factor is folded back into the
    counts before it underflows. Each bin must equal the plainly decayed count throughout."""
    cfg = PredictorConfig(decay=0.9)  # 0.9 ** 3000 ~ 1e-137: past the fold
    p = OutputLengthPredictor(cfg)
    rng = np.random.default_rng(2)
    want = np.zeros(p._bins)
    for i in range(3000):
        n = int(rng.integers(1, 4000))
        p.observe(feats(), n)
        want *= cfg.decay
        want[p._bin(n)] += 1.0
        if i % 500 == 499:
            h = p._hists[("g",)]
            assert h.counts == pytest.approx(want, rel=1e-9, abs=1e-300)
            assert h.n == pytest.approx(want.sum(), rel=1e-9)
            assert 0 < p.predict(feats()).quantile(0.5) <= 4096
