"""Plugins by name: builds each configured plugin from its params Struct, with errors naming the entry.

A new plugin is one file in ``plugins/`` and one ``register`` line in :func:`default_registry`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec

from scheduler.placement.config import PluginSpec
from scheduler.placement.plugins.accelerator_scorer import AcceleratorScorer, AcceleratorScorerParams
from scheduler.placement.plugins.active_requests_scorer import ActiveRequestsParams, ActiveRequestsScorer
from scheduler.placement.plugins.health_filter import HealthFilter, HealthFilterParams
from scheduler.placement.plugins.kv_occupancy_scorer import KvOccupancyParams, KvOccupancyScorer
from scheduler.placement.plugins.max_score_picker import MaxScoreParams, MaxScorePicker
from scheduler.placement.plugins.prefill_backlog_filter import PrefillBacklogFilter, PrefillBacklogParams
from scheduler.placement.plugins.prefill_delay_scorer import PrefillDelayParams, PrefillDelayScorer
from scheduler.placement.plugins.prefix_affinity_scorer import PrefixAffinityParams, PrefixAffinityScorer
from scheduler.placement.plugins.queue_scorer import QueueScorer, QueueScorerParams
from scheduler.placement.plugins.random_picker import RandomParams, RandomPicker
from scheduler.placement.plugins.role_filter import RoleFilter, RoleFilterParams
from scheduler.placement.plugins.round_robin_picker import RoundRobinParams, RoundRobinPicker
from scheduler.placement.plugins.weighted_random_picker import WeightedRandomParams, WeightedRandomPicker
from transport.errors import ErrorCode, PdorchError


class PluginKind(enum.StrEnum):
    FILTER = "filter"
    SCORER = "scorer"
    PICKER = "picker"


class _Entry(NamedTuple):
    kind: PluginKind
    params_type: type[msgspec.Struct]
    factory: Callable[[Any], Any]


class Registry:
    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def register(
        self, name: str, kind: PluginKind, params_type: type[msgspec.Struct], factory: Callable[[Any], Any]
    ) -> None:
        if name in self._entries:
            raise PdorchError(ErrorCode.CONFIG, f"placement plugin {name!r} registered twice")
        self._entries[name] = _Entry(kind, params_type, factory)

    def names(self, kind: PluginKind) -> list[str]:
        return sorted(n for n, e in self._entries.items() if e.kind is kind)

    def build(self, spec: PluginSpec, kind: PluginKind, where: str) -> Any:
        """Build the plugin ``spec`` names; ``where`` says where it sits in the config (for errors)."""
        entry = self._entries.get(spec.type)
        if entry is None:
            raise PdorchError(
                ErrorCode.CONFIG,
                f"{where}: unknown {kind} {spec.type!r}; known: {', '.join(self.names(kind))}",
            )
        if entry.kind is not kind:
            raise PdorchError(ErrorCode.CONFIG, f"{where}: {spec.type!r} is a {entry.kind}, not a {kind}")
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
    r.register("role", PluginKind.FILTER, RoleFilterParams, RoleFilter)
    r.register("health", PluginKind.FILTER, HealthFilterParams, HealthFilter)
    r.register("prefill-backlog", PluginKind.FILTER, PrefillBacklogParams, PrefillBacklogFilter)
    r.register("kv-occupancy", PluginKind.SCORER, KvOccupancyParams, KvOccupancyScorer)
    r.register("queue", PluginKind.SCORER, QueueScorerParams, QueueScorer)
    r.register("active-requests", PluginKind.SCORER, ActiveRequestsParams, ActiveRequestsScorer)
    r.register("prefix-affinity", PluginKind.SCORER, PrefixAffinityParams, PrefixAffinityScorer)
    r.register("accelerator", PluginKind.SCORER, AcceleratorScorerParams, AcceleratorScorer)
    r.register("prefill-delay", PluginKind.SCORER, PrefillDelayParams, PrefillDelayScorer)
    r.register("max-score", PluginKind.PICKER, MaxScoreParams, MaxScorePicker)
    r.register("weighted-random", PluginKind.PICKER, WeightedRandomParams, WeightedRandomPicker)
    r.register("random", PluginKind.PICKER, RandomParams, RandomPicker)
    r.register("round-robin", PluginKind.PICKER, RoundRobinParams, RoundRobinPicker)
    return r
