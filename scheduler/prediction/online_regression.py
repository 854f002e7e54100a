"""Linear least squares learnt one observation at a time, forgetting old ones, coefficients >= 0.

The normal equations are kept as running sums, decayed by ``decay`` per observation (an
exponentially weighted fit that follows drift, as the output-length predictor's histograms do),
plus a fixed ridge pull of ``prior_weight`` towards the prior coefficients: a feature that never
varies (e.g. the decode batch of a node that never decodes) keeps its prior instead of making the
system singular. The fit is non-negative (every coefficient is a time per unit of work): a
coefficient the unconstrained solution drives below zero is pinned at zero and the rest refitted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class OnlineRegression:
    def __init__(self, prior: Sequence[float], *, prior_weight: float = 1.0, decay: float = 0.999) -> None:
        if prior_weight <= 0 or not 0.0 < decay <= 1.0:
            raise ValueError("need prior_weight > 0 and 0 < decay <= 1")
        k = len(prior)
        self._prior = np.asarray(prior, dtype=float)
        self._ridge = prior_weight
        self._decay = decay
        self._xtx = np.zeros((k, k))
        self._xty = np.zeros(k)
        self.weight = 0.0  # decayed number of observations
        self.observed = 0
        self._coef: tuple[float, ...] | None = tuple(float(c) for c in self._prior)

    def observe(self, x: Sequence[float], y: float) -> None:
        v = np.asarray(x, dtype=float)
        d = self._decay
        if d < 1.0:
            self._xtx *= d
            self._xty *= d
            self.weight *= d
        self._xtx += np.outer(v, v)
        self._xty += v * y
        self.weight += 1.0
        self.observed += 1
        self._coef = None

    def coef(self) -> tuple[float, ...]:
        if self._coef is None:
            self._coef = self._solve()
        return self._coef

    def predict(self, x: Sequence[float]) -> float:
        return max(0.0, float(np.dot(self.coef(), x)))

    def _solve(self) -> tuple[float, ...]:
        k = len(self._prior)
        a = self._xtx + self._ridge * np.eye(k)
        b = self._xty + self._ridge * self._prior
        free = np.ones(k, dtype=bool)
        coef = np.zeros(k)
        for _ in range(k):
            idx = np.flatnonzero(free)
            coef[:] = 0.0
            coef[idx] = np.linalg.solve(a[np.ix_(idx, idx)], b[idx])
            negative = free & (coef < 0)
            if not negative.any():
                break
            free &= ~negative
            if not free.any():
                coef[:] = 0.0
                break
        return tuple(float(c) for c in np.maximum(coef, 0.0))
