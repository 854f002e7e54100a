"""Linear least squares learnt one observation at a time, forgetting old ones, coefficients >= 0.

The normal equations are kept as running sums, decayed by ``decay`` per observation (an
exponentially weighted fit that follows drift, as the output-length predictor's histograms do);
observations are queued as they come and folded into the sums in one matrix product when the
coefficients are next read (placement reads them about once a second, and a node answers many
requests in between), so observing costs an append,
plus a fixed ridge pull of ``prior_weight`` towards the prior coefficients: a feature that never
varies (e.g. the decode batch of a node that never decodes) keeps its prior instead of making the
system singular. The fit is non-negative (every coefficient is a time per unit of work): a
coefficient the unconstrained solution drives below zero is pinned at zero and the rest refitted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# At most this many observations wait to be folded into the sums (reading the coefficients folds them too).
FOLD_AT = 256


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
        self._queued: list[tuple[Sequence[float], float]] = []  # not folded into the sums yet
        self.weight = 0.0  # decayed number of observations
        self.observed = 0
        self._coef: tuple[float, ...] | None = tuple(float(c) for c in self._prior)

    def observe(self, x: Sequence[float], y: float) -> None:
        self._queued.append((x, y))
        if len(self._queued) >= FOLD_AT:
            self._fold()
        self.weight = self.weight * self._decay + 1.0
        self.observed += 1
        self._coef = None

    def coef(self) -> tuple[float, ...]:
        if self._coef is None:
            self._fold()
            self._coef = self._solve()
        return self._coef

    def _fold(self) -> None:
        """Decay the sums by the queued observations' count and add each one's ``x x^T`` and
        ``x y``, weighted by the decay of the observations after it: what observing them one at a
        time would have left."""
        if not self._queued:
            return
        x = np.array([x for x, _ in self._queued], dtype=float)
        y = np.array([y for _, y in self._queued], dtype=float)
        m, d = len(self._queued), self._decay
        self._queued.clear()
        w = d ** np.arange(m - 1, -1, -1, dtype=float)
        xw = x.T * w
        self._xtx = d**m * self._xtx + xw @ x
        self._xty = d**m * self._xty + xw @ y

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
