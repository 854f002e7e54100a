"""Online output-length predictor: a distribution of output tokens per request, learnt from finished ones.

Model: log-spaced histograms of observed output lengths, kept per feature bucket, from general to
specific: everything; the model (or adapter); model + max_tokens range; model + prompt-length range;
model + tenant (+ prompt range); model + prompt template (the first prefix-block hash; + tenant);
model + client hint. A prediction starts from the global histogram and, level by level, mixes in the
more specific one in proportion to its evidence (``p = (h + s * p_prev) / (n + s)``, hierarchical
shrinkage with prior strength ``s``), so a new template starts at its tenant's or the global
distribution and moves to its own as it is observed. Counts decay (``decay`` per observation) so the
model follows drifting traffic. The result is clipped at ``max_tokens`` and returned as quantiles.

Everything is a few dict lookups and numpy ops on ~140-bin vectors: tens of microseconds per call.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import OrderedDict

import msgspec
import numpy as np

from scheduler.placement.kv_budget import quantile_from
from transport.errors import ErrorCode, PdorchError


class OutputFeatures(msgspec.Struct, frozen=True):
    prompt_len: int
    max_tokens: int = 0  # 0 = unknown
    model: str = ""  # model or adapter name
    tenant: str = ""  # API key / tenant
    template_key: int = 0  # e.g. the first prefix-block hash (same template -> similar outputs); 0 = none
    hint: int = 0  # client-supplied expected output length (a request header); 0 = none


class OutputPrediction(msgspec.Struct, frozen=True):
    quantiles: tuple[tuple[float, int], ...]  # (level, tokens), ascending
    mean: float

    def quantile(self, level: float) -> int:
        return quantile_from(self.quantiles, level)


class PredictorConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    levels: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
    prior_strength: float = 4.0
    decay: float = 0.999
    bins_per_octave: int = 8
    max_len: int = 1 << 17
    # Weight of a client hint before anything has been learnt about hints of that size.
    hint_strength: float = 8.0
    # Bound on remembered feature buckets (least recently used are forgotten).
    max_keys: int = 200_000

    def validate(self) -> None:
        if (
            not self.levels
            or any(not 0.0 < q < 1.0 for q in self.levels)
            or list(self.levels) != sorted(self.levels)
        ):
            raise PdorchError(
                ErrorCode.CONFIG, f"predictor.levels must be ascending in (0, 1), got {self.levels}"
            )
        if self.prior_strength <= 0 or not 0.0 < self.decay <= 1.0 or self.bins_per_octave <= 0:
            raise PdorchError(
                ErrorCode.CONFIG, "predictor: prior_strength > 0, 0 < decay <= 1, bins_per_octave > 0"
            )
        if self.max_len < 2 or self.max_keys < 8 or self.hint_strength < 0:
            raise PdorchError(ErrorCode.CONFIG, "predictor: max_len >= 2, max_keys >= 8, hint_strength >= 0")


# A histogram's stored counts are folded back into its scale once the scale falls below this.
_RESCALE_BELOW = 1e-100


class _Hist:
    """Decayed counts per bin, kept as ``stored * scale``: decaying one is a scalar product, not a
    pass over every bin (the predictor observes every finished request under each of its keys)."""

    __slots__ = ("n", "scale", "stored")

    def __init__(self, bins: int) -> None:
        self.stored = np.zeros(bins)
        self.scale = 1.0
        self.n = 0.0  # the decayed count of observations (the sum of the counts)

    @property
    def counts(self) -> np.ndarray:
        return self.stored * self.scale

    def add(self, b: int, decay: float) -> None:
        self.scale *= decay
        self.n = self.n * decay + 1.0
        self.stored[b] += 1.0 / self.scale
        if self.scale < _RESCALE_BELOW:  # keep the stored counts far from overflow
            self.stored *= self.scale
            self.scale = 1.0


class OutputLengthPredictor:
    def __init__(self, config: PredictorConfig | None = None) -> None:
        config = config or PredictorConfig()
        config.validate()
        self.config = config
        self._bpo = config.bins_per_octave
        self._bins = math.ceil(math.log2(config.max_len) * self._bpo) + 1
        # Bin i holds lengths in [2^(i/bpo), 2^((i+1)/bpo)); its representative is the geometric middle.
        self._mid_list = np.exp2((np.arange(self._bins) + 0.5) / self._bpo).tolist()
        self._hists: OrderedDict[tuple, _Hist] = OrderedDict()
        self._level_list = [float(q) for q in config.levels]
        self.observed = 0

    # ------------------------------------------------------------------ public

    def predict(self, f: OutputFeatures) -> OutputPrediction:
        # Once per request on the scheduler's hot path: after the one weighted sum, plain floats and
        # bisect, where numpy's calls on a few dozen bins would cost more (several times more
        # under load, their code out of the CPU's caches).
        mass = self._distribution(f).tolist()
        cum = list(itertools.accumulate(mass))
        cap = f.max_tokens if f.max_tokens > 0 else self.config.max_len
        levels = self._level_list
        quantiles = tuple(
            (q, max(1, min(cap, v))) for q, v in zip(levels, self._quantiles(mass, cum), strict=True)
        )
        # The mean of min(length, cap): a bin whose middle is within the cap counts at its middle,
        # the others at the cap.
        within = bisect.bisect_right(self._mid_list, cap)
        below = sum(m * x for m, x in zip(self._mid_list[:within], mass[:within], strict=True))
        mean = below + cap * (cum[-1] - (cum[within - 1] if within else 0.0))
        return OutputPrediction(quantiles, mean)

    def observe(self, f: OutputFeatures, true_len: int) -> None:
        b = self._bin(true_len)
        decay = self.config.decay
        for key in self._keys(f):
            h = self._hists.get(key)
            if h is None:
                h = self._hists[key] = _Hist(self._bins)
                if len(self._hists) > self.config.max_keys:
                    self._hists.popitem(last=False)
            else:
                self._hists.move_to_end(key)
            h.add(b, decay)
        self.observed += 1

    # ------------------------------------------------------------------ internals

    def _bin(self, length: int) -> int:
        if length <= 1:
            return 0
        return min(self._bins - 1, int(math.log2(length) * self._bpo))

    def _keys(self, f: OutputFeatures) -> list[tuple]:
        m = f.model
        plen = int(math.log2(f.prompt_len + 1) * 2)  # half-octave prompt-length buckets
        keys: list[tuple] = [("g",), ("m", m)]
        if f.max_tokens > 0:
            keys.append(("mx", m, int(math.log2(f.max_tokens + 1))))
        keys.append(("mp", m, plen))
        if f.tenant:
            keys += [("mt", m, f.tenant), ("mtp", m, f.tenant, plen)]
        if f.template_key:
            keys.append(("mk", m, f.template_key))
            if f.tenant:
                keys.append(("mtk", m, f.tenant, f.template_key))
        if f.hint > 0:
            keys.append(("mh", m, self._bin(f.hint)))
        return keys

    def _distribution(self, f: OutputFeatures) -> np.ndarray:
        """Each key's histogram, from the broadest to the most specific, blended into what came
        before it with ``prior_strength`` pseudo-counts: ``p = (counts + s * p) / (n + s)``. The
        blend is linear, so the histograms' weights are worked out first (a few floats) and the
        distribution is one weighted sum of them rather than three array operations per key."""
        s = self.config.prior_strength
        rows: list[np.ndarray] = []
        weights: list[float] = []
        hint_bin, hint_weight = 0, 0.0
        for key in self._keys(f):
            if key[0] == "mh" and rows:
                # Before hints of this size have been observed, trust the hint itself a little.
                hs = self.config.hint_strength
                keep = s / (hs + s)
                weights = [w * keep for w in weights]
                hint_bin, hint_weight = key[2], hs / (hs + s)
            h = self._hists.get(key)
            if h is None or h.n <= 0:
                continue
            if rows:
                keep = s / (h.n + s)
                weights = [w * keep for w in weights]
                hint_weight *= keep
                weights.append(h.scale / (h.n + s))
            else:
                weights.append(h.scale / h.n)
            rows.append(h.stored)
        if not rows:
            # Nothing learnt yet: fall back on max_tokens (or a small default) as the whole distribution.
            p = np.zeros(self._bins)
            p[self._bin(f.hint or f.max_tokens or 256)] = 1.0
            return p
        p = np.dot(weights, rows)
        if hint_weight:
            p[hint_bin] += hint_weight
        return p

    def _quantiles(self, mass: list[float], cum: list[float]) -> list[int]:
        last = self._bins - 1
        out = []
        for level in self._level_list:
            q = level * cum[-1]
            i = min(bisect.bisect_left(cum, q), last)
            below = cum[i - 1] if i > 0 else 0.0
            frac = (q - below) / mass[i] if mass[i] > 0 else 0.5
            out.append(round(2.0 ** ((i + min(1.0, max(0.0, frac))) / self._bpo)))
        return out
