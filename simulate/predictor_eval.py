"""Online accuracy of the output-length predictor on a trace, next to naive baselines.

Online means in trace order: predict request i from requests 0..i-1 only, then observe its true
length. Metrics: mean absolute error (tokens) and Spearman rank correlation with the true lengths.
Baselines: the global running mean of outputs so far, and ``max_tokens`` (a constant here, so its
rank correlation is undefined and reported as 0).
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import numpy as np

from scheduler.prediction.output_length import OutputFeatures, OutputLengthPredictor, PredictorConfig
from simulate.trace import Trace, TraceRequest


class PredictorScore(msgspec.Struct, frozen=True):
    name: str
    mae: float
    spearman: float


class PredictorReport(msgspec.Struct, frozen=True):
    trace: str
    requests: int
    scores: tuple[PredictorScore, ...]
    # Share of requests whose true length was within the predicted 0.9 quantile.
    coverage_p90: float


def features_of(r: TraceRequest, model: str = "") -> OutputFeatures:
    return OutputFeatures(
        prompt_len=r.prompt_len,
        max_tokens=r.max_tokens,
        model=model,
        tenant=r.tenant,
        template_key=r.hash_ids[0] if r.hash_ids else 0,
    )


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = rankdata(np.asarray(a, float)), rankdata(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def evaluate(trace: Trace, config: PredictorConfig | None = None) -> PredictorReport:
    predictor = OutputLengthPredictor(config)
    truth = np.array([r.output_len for r in trace.requests], dtype=float)
    median, p90, running_mean = [], [], []
    total = 0.0
    for i, r in enumerate(trace.requests):
        f = features_of(r)
        pred = predictor.predict(f)
        median.append(pred.quantile(0.5))
        p90.append(pred.quantile(0.9))
        running_mean.append(total / i if i else 0.0)
        predictor.observe(f, r.output_len)
        total += r.output_len
    max_tokens = np.array([r.max_tokens for r in trace.requests], dtype=float)

    def score(
        name: str, guess: np.ndarray, rank: Callable[[np.ndarray, np.ndarray], float] = spearman
    ) -> PredictorScore:
        return PredictorScore(name, float(np.abs(guess - truth).mean()), rank(guess, truth))

    return PredictorReport(
        trace=trace.name,
        requests=len(truth),
        scores=(
            score("predictor (median)", np.array(median, float)),
            score("global running mean", np.array(running_mean)),
            score("max_tokens", max_tokens),
        ),
        coverage_p90=float((truth <= np.array(p90)).mean()),
    )
