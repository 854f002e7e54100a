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

A node can be slower or faster than its class's typical node (a throttled or degraded GPU, a noisy
neighbour): each prefill and decode observation also compares the node's time with what its class's
published models predicted, and the node's **speed factor** is the geometric mean of those ratios
over its last ``NODE_WINDOW`` observations, relative to the median node of its class (and pulled
towards it while the node has been seen only a few times: early ratios say little). Placement
predicts each node with its class's models scaled by its factor, and the class's models learn from
observations divided by it, so one straggler neither looks like its class nor slows its class's
models (which would move every request off the class's healthy nodes).

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

import math
import statistics
from collections.abc import Sequence

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
    scaled,
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
    worker_id: str = ""  # the node observed ("": its class only)


class DecodeSample(msgspec.Struct, frozen=True, gc=False):
    model: str
    accelerator: str
    steps: int
    batch: float
    context: float
    prefill_tokens: int  # uncached prompt tokens the node prefilled meanwhile
    seconds: float
    worker_id: str = ""  # the node observed ("": its class only)


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
# A node's speed factor averages its last this many observations (about as many seconds of decoding:
# a degraded node is seen within half a minute, and a noisy second moves it little). One
# observation's ratio counts at most this far from 1 either way (a tiny predicted time is no measure).
NODE_WINDOW = 20
MAX_NODE_RATIO = 10.0
_SAME = (1.0, 1.0)  # the speed factors of a node not observed yet: its class's


class _Ratio:
    """How a node's times of one kind (prefills, or decode steps) compare with its class's
    predictions: the mean log ratio of its last ``NODE_WINDOW`` observations."""

    __slots__ = ("log_ratio", "seen")

    def __init__(self) -> None:
        self.log_ratio = 0.0
        self.seen = 0

    def observe(self, seconds: float, predicted: float) -> None:
        if seconds <= 0.0 or predicted <= 0.0:
            return
        bound = math.log(MAX_NODE_RATIO)
        r = max(-bound, min(bound, math.log(seconds / predicted)))
        self.seen += 1
        self.log_ratio += (r - self.log_ratio) / min(self.seen, NODE_WINDOW)

    def shrunk(self, reference: float) -> float:
        """The log ratio relative to ``reference`` (its class's median), pulled towards it by
        ``NODE_WINDOW`` observations' worth of doubt: a node seen a few times (a cluster that has
        just started, its class's models still rough) is not yet told apart from its class."""
        return (self.log_ratio - reference) * self.seen / (self.seen + NODE_WINDOW)


# What a node's speed is learnt from, in the order of its factors.
SPEED_KINDS = ("prefill", "decode")


class _NodeSpeed:
    __slots__ = ("cls", "decode", "prefill")

    def __init__(self, cls: str) -> None:
        self.cls = cls
        self.prefill = _Ratio()
        self.decode = _Ratio()

    @property
    def ratios(self) -> tuple[_Ratio, _Ratio]:
        return self.prefill, self.decode  # as SPEED_KINDS


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
        self._nodes: dict[str, _NodeSpeed] = {}
        # Each observed node's (prefill, decode) speed factors, as last published.
        self._factors: dict[str, tuple[float, float]] = {}
        self._published_at = -float("inf")
        self._changed = True
        self.observed = 0

    # ------------------------------------------------------------------ learning

    def observe_prefill(self, s: PrefillSample) -> None:
        x = prefill_x(s.uncached, s.cached, s.batch, s.context)
        c = self._class(s.model, s.accelerator)
        factor = self._factors.get(s.worker_id, _SAME)[0]
        if s.adapter_load:
            c.observe_load(max(0.0, s.seconds - factor * c.prefill.predict(x)))
        else:
            published = self._table.classes.get(class_key(s.model, s.accelerator))
            if published is not None and s.worker_id:
                node = self._node(s.worker_id, s.model, s.accelerator)
                node.prefill.observe(s.seconds, published.prefill.predict(x))
            c.prefill.observe(x, s.seconds / factor)
        self._learnt()

    def observe_decode(self, s: DecodeSample) -> None:
        if s.steps < 1:
            return
        x = decode_x(s.batch, s.context, s.prefill_tokens / s.steps)
        step = s.seconds / s.steps
        published = self._table.classes.get(class_key(s.model, s.accelerator))
        if published is not None and s.worker_id:
            self._node(s.worker_id, s.model, s.accelerator).decode.observe(step, published.decode.predict(x))
        self._class(s.model, s.accelerator).decode.observe(x, step / self._factors.get(s.worker_id, _SAME)[1])
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

    def table(self, now: float, nodes: Sequence[tuple[str, str, str]] = ()) -> LatencyTable:
        """The models as placement sees them now. ``nodes`` (worker id, model, accelerator): the
        cluster's; their classes get at least a prior, and the speed of a node no longer among them
        is forgotten."""
        for _, model, accelerator in nodes:
            if class_key(model, accelerator) not in self._classes:
                self._class(model, accelerator)
        if self._changed and now - self._published_at >= self._interval:
            if nodes:
                for gone in self._nodes.keys() - {worker_id for worker_id, _, _ in nodes}:
                    del self._nodes[gone]
            classes = {
                k: ClassLatency(LinearModel(c.prefill.coef()), LinearModel(c.decode.coef()))
                for k, c in self._classes.items()
            }
            self._factors = self._speed_factors()
            self._table = LatencyTable(
                classes=classes,
                nodes={w: scaled(classes[self._nodes[w].cls], *f) for w, f in self._factors.items()},
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

    def speed_factors(self) -> dict[str, tuple[float, float]]:
        """Each observed node's (prefill, decode) speed factors as last published (> 1: slower than
        its class's median node)."""
        return dict(self._factors)

    # ------------------------------------------------------------------ internals

    def _node(self, worker_id: str, model: str, accelerator: str) -> _NodeSpeed:
        found = self._nodes.get(worker_id)
        if found is None:
            found = self._nodes[worker_id] = _NodeSpeed(class_key(model, accelerator))
        return found

    def _speed_factors(self) -> dict[str, tuple[float, float]]:
        """Each observed node's time ratios relative to the median node of its class (prefills and
        decode steps apart: a class's nodes may each do mostly one of them). A node with no
        observations of one kind takes its factor of the other: a degraded part is slow at both."""
        samples: dict[tuple[str, int], list[float]] = {}
        for node in self._nodes.values():
            for i, ratio in enumerate(node.ratios):
                if ratio.seen:
                    samples.setdefault((node.cls, i), []).append(ratio.log_ratio)
        medians = {key: statistics.median(logs) for key, logs in samples.items()}
        out = {}
        for worker_id, node in self._nodes.items():
            p, d = (r.shrunk(medians[node.cls, i]) if r.seen else None for i, r in enumerate(node.ratios))
            if p is not None or d is not None:
                p = d if p is None else p
                out[worker_id] = (math.exp(p), math.exp(p if d is None else d))
        return out

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
