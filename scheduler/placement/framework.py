"""The placement engine: per pool, filter -> score -> pick; a decider turns the picks into a Placement.

Modelled on the Gateway API Inference Extension scheduler: a profile is filters, weighted scorers
and one picker; a profile handler plugin runs the profiles: the P/D handler
(``plugins/handlers/pd_profile_handler.py``) runs the decode profile first, then the configured
decider plugin says whether and where to prefill remotely; the SLO handler
(``plugins/handlers/slo_profile_handler.py``) chooses the pair jointly on predicted latencies. The
framework, not the plugins, measures each plugin's decision latency, with a clock the caller injects (the live
scheduler passes ``time.perf_counter``; without one nothing is measured and placement stays a pure
function of its inputs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import msgspec

from scheduler.placement.config import PlacementConfig, PluginSpec, ProfileConfig, load_placement_config
from scheduler.placement.context import Pool, RequestContext
from scheduler.placement.plugin import Decider, Filter, Picker, Scorer
from scheduler.placement.registry import PluginKind, Registry, default_registry
from scheduler.placement.types import ClusterSnapshot, NodeView, Placement, PlacementRequest
from transport.errors import ErrorCode, PdorchError
from transport.messages import Role

R = TypeVar("R")


class PluginLatency(msgspec.Struct):
    calls: int = 0
    total_s: float = 0.0
    max_s: float = 0.0


class _FilterStep(NamedTuple):
    label: str  # "decode/filter/role" (unique within the placer)
    plugin: Filter


class _ScorerStep(NamedTuple):
    label: str
    plugin: Scorer
    weight: float


class _PickerStep(NamedTuple):
    label: str
    plugin: Picker


class _Profile(NamedTuple):
    filters: tuple[_FilterStep, ...]
    scorers: tuple[_ScorerStep, ...]
    picker: _PickerStep


def _build_profile(pool: Pool, cfg: ProfileConfig, registry: Registry) -> _Profile:
    where = f"placement.{pool}"
    seen: set[str] = set()

    def label(kind: PluginKind, i: int | None, spec: PluginSpec) -> str:
        out = f"{pool}/{kind}/{spec.type}"
        if out in seen:
            out = f"{out}#{i}"
        seen.add(out)
        return out

    filters = tuple(
        _FilterStep(label(PluginKind.FILTER, i, s), registry.build_filter(s, f"{where}.filters[{i}]"))
        for i, s in enumerate(cfg.filters)
    )
    scorers = tuple(
        _ScorerStep(
            label(PluginKind.SCORER, i, s), registry.build_scorer(s, f"{where}.scorers[{i}]"), s.weight
        )
        for i, s in enumerate(cfg.scorers)
    )
    picker = _PickerStep(
        label(PluginKind.PICKER, None, cfg.picker), registry.build_picker(cfg.picker, f"{where}.picker")
    )
    return _Profile(filters, scorers, picker)


class Placer:
    """``Placer(config).place(snapshot, request) -> Placement``; raises NO_WORKER when nothing qualifies."""

    def __init__(
        self,
        config: PlacementConfig | Any = None,
        *,
        registry: Registry | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.config = load_placement_config(config) if config is not None else PlacementConfig()
        self.config.reservation.validate()
        registry = registry or default_registry()
        self._profiles = {
            Pool.DECODE: _build_profile(Pool.DECODE, self.config.decode, registry),
            Pool.PREFILL: _build_profile(Pool.PREFILL, self.config.prefill, registry),
        }
        # Neither is timed as a plugin: their time includes the profiles', which are timed.
        self._decider = registry.build_decider(self.config.decider, "placement.decider")
        self._handler = registry.build_handler(self.config.handler, "placement.handler")
        # The roles of the workers this placement may run a request on whole: "both" workers,
        # prefill workers with fallback_to_prefill_node, decode workers if the handler lets them
        # prefill (what admission and /ready accept as enough workers, besides a prefill and a decode).
        roles = {Role.BOTH}
        if self.config.fallback_to_prefill_node:
            roles.add(Role.PREFILL)
        if self._handler.decode_prefills(self._decider):
            roles.add(Role.DECODE)
        self.whole_request_roles = frozenset(roles)
        # A decision may be taken on a sample of a large cluster's nodes first (the planner's).
        self.samples = self._handler.samples and self.config.sample > 0
        self._clock = clock
        self._latency: dict[str, PluginLatency] = {}

    def place(self, snapshot: ClusterSnapshot, request: PlacementRequest) -> Placement:
        nodes = [n for n in snapshot.nodes if n.model == request.model]
        if not nodes:
            raise PdorchError(ErrorCode.NO_WORKER, f"no worker serves model {request.model!r}")
        ctx = RequestContext(request, self.config)
        return self._handler.place(self, ctx, nodes, snapshot.latency)

    @property
    def decider(self) -> Decider:
        return self._decider

    def candidates(self, pool: Pool, ctx: RequestContext, nodes: Sequence[NodeView]) -> Sequence[NodeView]:
        """Run only ``pool``'s filters."""
        profile = self._profiles[pool]
        ctx.pool = pool
        candidates: Sequence[NodeView] = nodes
        for f in profile.filters:
            candidates = self._run(f.label, f.plugin.filter, ctx, candidates)
            if not candidates:
                break
        return candidates

    def select(self, pool: Pool, ctx: RequestContext, nodes: Sequence[NodeView]) -> NodeView | None:
        """Run ``pool``'s profile over ``nodes``; None when the filters leave nothing."""
        profile = self._profiles[pool]
        candidates = self.candidates(pool, ctx, nodes)
        if not candidates:
            return None
        if len(candidates) == 1 and not profile.scorers:
            return candidates[0]
        totals = self.scores(pool, ctx, candidates)
        return self._run(profile.picker.label, profile.picker.plugin.pick, ctx, candidates, totals)

    def scores(self, pool: Pool, ctx: RequestContext, nodes: Sequence[NodeView]) -> list[float]:
        """Run only ``pool``'s scorers: each node's weighted total."""
        ctx.pool = pool
        totals = [0.0] * len(nodes)
        for s in self._profiles[pool].scorers:
            if s.weight == 0.0:
                continue
            scores = self._run(s.label, s.plugin.score, ctx, nodes)
            w = s.weight
            totals = [t + w * min(1.0, max(0.0, x)) for t, x in zip(totals, scores, strict=True)]
        return totals

    def latency(self) -> dict[str, PluginLatency]:
        """Per-plugin decision latency so far (a copy), keyed ``pool/kind/type``."""
        return {k: msgspec.structs.replace(v) for k, v in self._latency.items()}

    def _run(self, label: str, fn: Callable[..., R], *args: Any) -> R:
        clock = self._clock
        if clock is None:
            return fn(*args)
        start = clock()
        result = fn(*args)
        elapsed = clock() - start
        stat = self._latency.get(label)
        if stat is None:
            stat = self._latency[label] = PluginLatency()
        stat.calls += 1
        stat.total_s += elapsed
        stat.max_s = max(stat.max_s, elapsed)
        return result
