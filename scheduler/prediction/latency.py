"""Latency models learnt online per node class from what the cluster observes.

Three observations come from the request lifecycle (the ledger turns events into them, the same
way in the live scheduler and in the simulator):

* a **prefill**: the time from the moment a node could start a prompt (sent to it, and the prompt
  before it answered) to its first token, with the uncached and cached tokens and the node's decode
  batch meanwhile;
* a **decode**: a node's time over the decode steps its batch took since the last observation of
  it (every ``PROGRESS_INTERVAL_S`` of placements, while requests decode, so a burst of long answers is seen
  long before any of them ends), with its average batch and context meanwhile and the prompt tokens
  it prefilled in between (chunked prefills stall the batch);
* a **handoff**: the time from the first token to the KV landing on the decode node, with its size.

A prefill that had to load its LoRA adapter first (not resident on the node when it was booked)
does not teach the prefill model: what that model does not explain of its time is the load, and an
average of those residuals per node class is the **adapter load time** placement assumes (it starts
from the accelerator table's ``adapter_load_s``, which counts as one observation).

A request that ends says whether it met its TPOT objective (a :class:`TpotOutcome`). The latency models
predict a step from the batch as it is; a request's TPOT also pays for what joins the batch after
it and for prefills the node runs meanwhile. Per decode class a **TPOT margin** (a share of the
objective placement keeps in reserve) is adapted so that about ``TPOT_MISS_TARGET`` of the requests
miss it: it stays 0 where the predictions hold and grows where the batches run at the edge.

Each fits a non-negative linear model on the features of :mod:`scheduler.placement.latency_model`
(:class:`~scheduler.prediction.online_regression.OnlineRegression`), per node class
(model + accelerator) and, for handoffs, per pair of classes. Nothing is set by hand: a class
starts from the prior (prefill throughput from the accelerator table) and the data takes over
within a few observations. Placement reads the models frozen in a
:class:`~scheduler.placement.latency_model.LatencyTable`, republished at most once per
``publish_interval_s`` of the caller's clock (live: seconds; simulator: virtual seconds), so a
burst of observations does not rebuild every node's view each time.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from scheduler.placement.config import DEFAULT_ADAPTER_LOAD_S, AcceleratorProfile
from scheduler.placement.latency_model import (
    ClassLatency,
    LatencyTable,
    LinearModel,
    class_key,
    decode_x,
    handoff_x,
    link_key,
    prefill_x,
    prior_decode,
    prior_handoff,
    prior_prefill,
)
from scheduler.prediction.online_regression import OnlineRegression

# Per observation, the weight of everything seen before (the output-length predictor's decay).
DECAY = 0.999
# The prior counts as one observation.
PRIOR_WEIGHT = 1.0
PUBLISH_INTERVAL_S = 1.0
# A node's decode batch is observed at most this often (caller's clock, like the publication).
PROGRESS_INTERVAL_S = 1.0


class PrefillSample(msgspec.Struct, frozen=True, gc=False):
    model: str
    accelerator: str
    uncached: int
    cached: int
    batch: float  # the node's decoding requests, averaged over the prefill
    context: float  # their prompt tokens, averaged likewise
    seconds: float
    adapter_load: bool = False  # its LoRA adapter was loaded first (the time includes the load)


class DecodeSample(msgspec.Struct, frozen=True, gc=False):
    model: str
    accelerator: str
    steps: int
    batch: float
    context: float
    prefill_tokens: int  # uncached prompt tokens the node prefilled meanwhile
    seconds: float


class TpotOutcome(msgspec.Struct, frozen=True, gc=False):
    """A request with a TPOT objective ended on a node of this class: did it meet it?"""

    model: str
    accelerator: str
    met: bool


class HandoffSample(msgspec.Struct, frozen=True, gc=False):
    model: str
    prefill_accelerator: str
    decode_accelerator: str
    kv_bytes: int
    seconds: float


# Adapter loads averaged over at most this many (then exponentially weighted: it follows drift).
LOAD_WINDOW = 50
# The TPOT margin: the share of requests placed to meet their TPOT objective that may miss it (half
# of what a 90% attainment objective allows, the other half left to TTFT), the step of its
# stochastic approximation per finished request, and its ceiling.
TPOT_MISS_TARGET = 0.05
TPOT_MARGIN_STEP = 0.01
TPOT_MARGIN_MAX = 0.5


class _Class:
    __slots__ = ("adapter_load_s", "decode", "loads", "prefill", "tpot_margin")

    def __init__(self, profile: AcceleratorProfile | None) -> None:
        self.prefill = OnlineRegression(prior_prefill(profile).coef, prior_weight=PRIOR_WEIGHT, decay=DECAY)
        self.decode = OnlineRegression(prior_decode(profile).coef, prior_weight=PRIOR_WEIGHT, decay=DECAY)
        self.adapter_load_s = profile.adapter_load_s if profile is not None else DEFAULT_ADAPTER_LOAD_S
        self.loads = 0  # adapter loads observed
        self.tpot_margin = 0.0

    def observe_tpot(self, met: bool) -> None:
        """Robbins-Monro on the miss rate: each miss widens the margin, each hit narrows it, so it
        settles where ``TPOT_MISS_TARGET`` of the requests miss (0 while predictions hold)."""
        miss = 0.0 if met else 1.0
        self.tpot_margin += TPOT_MARGIN_STEP * (miss - TPOT_MISS_TARGET)
        self.tpot_margin = min(TPOT_MARGIN_MAX, max(0.0, self.tpot_margin))

    def observe_load(self, seconds: float) -> None:
        self.loads += 1
        self.adapter_load_s += (seconds - self.adapter_load_s) / min(self.loads + PRIOR_WEIGHT, LOAD_WINDOW)


class LatencyLearner:
    def __init__(
        self,
        accelerators: dict[str, AcceleratorProfile],
        *,
        publish_interval_s: float = PUBLISH_INTERVAL_S,
    ) -> None:
        self._accelerators = accelerators
        self._interval = publish_interval_s
        self._classes: dict[str, _Class] = {}
        self._links: dict[str, OnlineRegression] = {}
        self._table = LatencyTable()
        self._published_at = -float("inf")
        self._changed = True
        self.observed = 0

    # ------------------------------------------------------------------ learning

    def observe_prefill(self, s: PrefillSample) -> None:
        x = prefill_x(s.uncached, s.cached, s.batch, s.context)
        c = self._class(s.model, s.accelerator)
        if s.adapter_load:
            c.observe_load(max(0.0, s.seconds - c.prefill.predict(x)))
        else:
            c.prefill.observe(x, s.seconds)
        self._learnt()

    def observe_decode(self, s: DecodeSample) -> None:
        if s.steps < 1:
            return
        x = decode_x(s.batch, s.context, s.prefill_tokens / s.steps)
        self._class(s.model, s.accelerator).decode.observe(x, s.seconds / s.steps)
        self._learnt()

    def observe_tpot(self, o: TpotOutcome) -> None:
        self._class(o.model, o.accelerator).observe_tpot(o.met)
        self._learnt()

    def observe_handoff(self, s: HandoffSample) -> None:
        key = link_key(s.model, s.prefill_accelerator, s.decode_accelerator)
        link = self._links.get(key)
        if link is None:
            link = self._links[key] = OnlineRegression(
                prior_handoff().coef, prior_weight=PRIOR_WEIGHT, decay=DECAY
            )
        link.observe(handoff_x(s.kv_bytes), s.seconds)
        self._learnt()

    # ------------------------------------------------------------------ reading

    def table(self, now: float, classes: Iterable[tuple[str, str]] = ()) -> LatencyTable:
        """The models as placement sees them now; ``classes`` (model, accelerator) get at least a prior."""
        for model, accelerator in classes:
            if class_key(model, accelerator) not in self._classes:
                self._class(model, accelerator)
        if self._changed and now - self._published_at >= self._interval:
            self._table = LatencyTable(
                classes={
                    k: ClassLatency(LinearModel(c.prefill.coef()), LinearModel(c.decode.coef()))
                    for k, c in self._classes.items()
                },
                handoffs={k: LinearModel(r.coef()) for k, r in self._links.items()},
                adapter_load_s={k: c.adapter_load_s for k, c in self._classes.items() if c.loads},
                tpot_margin={k: c.tpot_margin for k, c in self._classes.items() if c.tpot_margin > 0},
                version=self._table.version + 1,
            )
            self._published_at = now
            self._changed = False
        return self._table

    def tpot_margins(self) -> dict[str, float]:
        """The TPOT margin of every node class seen (0: its predictions hold), as learnt now."""
        return {k: c.tpot_margin for k, c in self._classes.items()}

    # ------------------------------------------------------------------ internals

    def _class(self, model: str, accelerator: str) -> _Class:
        key = class_key(model, accelerator)
        found = self._classes.get(key)
        if found is None:
            found = self._classes[key] = _Class(self._accelerators.get(accelerator))
            self._changed = True
            self._published_at = -float("inf")  # a new class is published at once
        return found

    def _learnt(self) -> None:
        self.observed += 1
        self._changed = True
