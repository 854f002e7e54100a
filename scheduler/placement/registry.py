"""Plugins by name: builds each configured plugin from its params Struct, with errors naming the entry.

A new plugin is one file in its kind's folder under ``plugins/`` and one ``register_*`` line in
:func:`default_registry`. Each kind has its own table, so a plugin comes back typed by its protocol
(:mod:`scheduler.placement.plugin`), and a factory that does not build one is a type error.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec

from scheduler.placement.config import PluginSpec
from scheduler.placement.plugin import Decider, Filter, Picker, ProfileHandler, Scorer
from scheduler.placement.plugins.deciders.always_decider import AlwaysDecider, AlwaysDeciderParams
from scheduler.placement.plugins.deciders.conditional_decider import (
    ConditionalDecider,
    ConditionalDeciderParams,
)
from scheduler.placement.plugins.deciders.never_decider import NeverDecider, NeverDeciderParams
from scheduler.placement.plugins.deciders.threshold_decider import ThresholdDecider, ThresholdDeciderParams
from scheduler.placement.plugins.filters.adapter_slots_filter import (
    AdapterSlotsFilter,
    AdapterSlotsFilterParams,
)
from scheduler.placement.plugins.filters.health_filter import HealthFilter, HealthFilterParams
from scheduler.placement.plugins.filters.prefill_backlog_filter import (
    PrefillBacklogFilter,
    PrefillBacklogParams,
)
from scheduler.placement.plugins.filters.role_filter import RoleFilter, RoleFilterParams
from scheduler.placement.plugins.handlers.pd_profile_handler import PdProfileHandler, PdProfileHandlerParams
from scheduler.placement.plugins.handlers.slo_profile_handler import (
    SloProfileHandler,
    SloProfileHandlerParams,
)
from scheduler.placement.plugins.pickers.max_score_picker import MaxScoreParams, MaxScorePicker
from scheduler.placement.plugins.pickers.random_picker import RandomParams, RandomPicker
from scheduler.placement.plugins.pickers.round_robin_picker import RoundRobinParams, RoundRobinPicker
from scheduler.placement.plugins.pickers.weighted_random_picker import (
    WeightedRandomParams,
    WeightedRandomPicker,
)
from scheduler.placement.plugins.scorers.accelerator_scorer import AcceleratorScorer, AcceleratorScorerParams
from scheduler.placement.plugins.scorers.active_requests_scorer import (
    ActiveRequestsParams,
    ActiveRequestsScorer,
)
from scheduler.placement.plugins.scorers.adapter_affinity_scorer import (
    AdapterAffinityParams,
    AdapterAffinityScorer,
)
from scheduler.placement.plugins.scorers.kv_occupancy_scorer import KvOccupancyParams, KvOccupancyScorer
from scheduler.placement.plugins.scorers.prefill_delay_scorer import PrefillDelayParams, PrefillDelayScorer
from scheduler.placement.plugins.scorers.prefix_affinity_scorer import (
    PrefixAffinityParams,
    PrefixAffinityScorer,
)
from scheduler.placement.plugins.scorers.queue_scorer import QueueScorer, QueueScorerParams
from transport.errors import ErrorCode, PdorchError

P = TypeVar("P", bound=msgspec.Struct)
T = TypeVar("T")


class PluginKind(enum.StrEnum):
    FILTER = "filter"
    SCORER = "scorer"
    PICKER = "picker"
    DECIDER = "decider"
    HANDLER = "handler"


@dataclass(frozen=True)
class _Entry(Generic[T]):
    params_type: type[msgspec.Struct]
    factory: Callable[[Any], T]


class Registry:
    def __init__(self) -> None:
        self._filters: dict[str, _Entry[Filter]] = {}
        self._scorers: dict[str, _Entry[Scorer]] = {}
        self._pickers: dict[str, _Entry[Picker]] = {}
        self._deciders: dict[str, _Entry[Decider]] = {}
        self._handlers: dict[str, _Entry[ProfileHandler]] = {}

    def register_filter(self, name: str, params_type: type[P], factory: Callable[[P], Filter]) -> None:
        self._add(self._filters, name, params_type, factory)

    def register_scorer(self, name: str, params_type: type[P], factory: Callable[[P], Scorer]) -> None:
        self._add(self._scorers, name, params_type, factory)

    def register_picker(self, name: str, params_type: type[P], factory: Callable[[P], Picker]) -> None:
        self._add(self._pickers, name, params_type, factory)

    def register_decider(self, name: str, params_type: type[P], factory: Callable[[P], Decider]) -> None:
        self._add(self._deciders, name, params_type, factory)

    def register_handler(
        self, name: str, params_type: type[P], factory: Callable[[P], ProfileHandler]
    ) -> None:
        self._add(self._handlers, name, params_type, factory)

    def build_filter(self, spec: PluginSpec, where: str) -> Filter:
        """Build the filter ``spec`` names; ``where`` says where it sits in the config (for errors)."""
        return self._build(self._filters, PluginKind.FILTER, spec, where)

    def build_scorer(self, spec: PluginSpec, where: str) -> Scorer:
        return self._build(self._scorers, PluginKind.SCORER, spec, where)

    def build_picker(self, spec: PluginSpec, where: str) -> Picker:
        return self._build(self._pickers, PluginKind.PICKER, spec, where)

    def build_decider(self, spec: PluginSpec, where: str) -> Decider:
        return self._build(self._deciders, PluginKind.DECIDER, spec, where)

    def build_handler(self, spec: PluginSpec, where: str) -> ProfileHandler:
        return self._build(self._handlers, PluginKind.HANDLER, spec, where)

    def names(self, kind: PluginKind) -> list[str]:
        return sorted(self._table(kind))

    def _table(self, kind: PluginKind) -> dict[str, _Entry[Any]]:
        tables: dict[PluginKind, dict[str, _Entry[Any]]] = {
            PluginKind.FILTER: self._filters,
            PluginKind.SCORER: self._scorers,
            PluginKind.PICKER: self._pickers,
            PluginKind.DECIDER: self._deciders,
            PluginKind.HANDLER: self._handlers,
        }
        return tables[kind]

    def _kind_of(self, name: str) -> PluginKind | None:
        return next((kind for kind in PluginKind if name in self._table(kind)), None)

    def _add(
        self, table: dict[str, _Entry[T]], name: str, params_type: type[P], factory: Callable[[P], T]
    ) -> None:
        # One namespace for every kind, so a plugin named in the wrong place can be reported as such.
        if self._kind_of(name) is not None:
            raise PdorchError(ErrorCode.CONFIG, f"placement plugin {name!r} registered twice")
        table[name] = _Entry(params_type, factory)

    def _build(self, table: dict[str, _Entry[T]], kind: PluginKind, spec: PluginSpec, where: str) -> T:
        entry = table.get(spec.type)
        if entry is None:
            actual = self._kind_of(spec.type)
            if actual is not None:
                raise PdorchError(ErrorCode.CONFIG, f"{where}: {spec.type!r} is a {actual}, not a {kind}")
            raise PdorchError(
                ErrorCode.CONFIG,
                f"{where}: unknown {kind} {spec.type!r}; known: {', '.join(self.names(kind))}",
            )
        if kind is PluginKind.SCORER:
            if not math.isfinite(spec.weight) or spec.weight < 0:
                raise PdorchError(
                    ErrorCode.CONFIG, f"{where} ({spec.type}): weight must be >= 0, got {spec.weight}"
                )
        elif spec.weight != 1.0:
            raise PdorchError(ErrorCode.CONFIG, f"{where} ({spec.type}): only scorers take a weight")
        try:
            params = msgspec.convert(spec.params, entry.params_type)
        except msgspec.ValidationError as e:
            raise PdorchError(ErrorCode.CONFIG, f"{where} ({spec.type}): bad parameter: {e}") from None
        try:
            return entry.factory(params)
        except ValueError as e:
            raise PdorchError(ErrorCode.CONFIG, f"{where} ({spec.type}): {e}") from None


def default_registry() -> Registry:
    r = Registry()
    r.register_filter("role", RoleFilterParams, RoleFilter)
    r.register_filter("health", HealthFilterParams, HealthFilter)
    r.register_filter("prefill-backlog", PrefillBacklogParams, PrefillBacklogFilter)
    r.register_filter("adapter-slots", AdapterSlotsFilterParams, AdapterSlotsFilter)
    r.register_scorer("kv-occupancy", KvOccupancyParams, KvOccupancyScorer)
    r.register_scorer("queue", QueueScorerParams, QueueScorer)
    r.register_scorer("active-requests", ActiveRequestsParams, ActiveRequestsScorer)
    r.register_scorer("prefix-affinity", PrefixAffinityParams, PrefixAffinityScorer)
    r.register_scorer("accelerator", AcceleratorScorerParams, AcceleratorScorer)
    r.register_scorer("prefill-delay", PrefillDelayParams, PrefillDelayScorer)
    r.register_scorer("adapter-affinity", AdapterAffinityParams, AdapterAffinityScorer)
    r.register_picker("max-score", MaxScoreParams, MaxScorePicker)
    r.register_picker("weighted-random", WeightedRandomParams, WeightedRandomPicker)
    r.register_picker("random", RandomParams, RandomPicker)
    r.register_picker("round-robin", RoundRobinParams, RoundRobinPicker)
    r.register_decider("always", AlwaysDeciderParams, AlwaysDecider)
    r.register_decider("never", NeverDeciderParams, NeverDecider)
    r.register_decider("threshold", ThresholdDeciderParams, ThresholdDecider)
    r.register_decider("conditional", ConditionalDeciderParams, ConditionalDecider)
    r.register_handler("pd", PdProfileHandlerParams, PdProfileHandler)
    r.register_handler("slo", SloProfileHandlerParams, SloProfileHandler)
    return r
