"""The kinds of placement plugin: every interface in one small file (as in the Gateway API
Inference Extension's ``plugins.go``).

A plugin is a small object built by the registry from its params Struct. It reads the candidates and
the :class:`~scheduler.placement.context.RequestContext`, and never does I/O or reads a clock. Each
kind lives in its own folder under ``plugins/``; the registry types every plugin by its protocol.
Filters, scorers and a picker make a profile; a profile handler runs the profiles and returns the
:class:`~scheduler.placement.types.Placement` (the ``pd`` handler asks a decider whether to prefill
remotely; the ``slo`` handler chooses the pair on predicted latencies).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from scheduler.placement.context import Pool, RequestContext
from scheduler.placement.latency_model import LatencyTable
from scheduler.placement.types import NodeView, Placement

# Runs the prefill profile over every node but the decode pick; None when its filters leave nothing.
PickPrefill = Callable[[], NodeView | None]


@runtime_checkable
class Filter(Protocol):
    def filter(self, ctx: RequestContext, nodes: Sequence[NodeView]) -> list[NodeView]:
        """The candidates that may serve the request (a subset of ``nodes``, in order)."""
        ...


@runtime_checkable
class Scorer(Protocol):
    def score(self, ctx: RequestContext, nodes: Sequence[NodeView]) -> list[float]:
        """One score in [0, 1] per node, higher is better. The profile supplies the weight."""
        ...


@runtime_checkable
class Picker(Protocol):
    def pick(self, ctx: RequestContext, nodes: Sequence[NodeView], scores: Sequence[float]) -> NodeView:
        """Choose one of ``nodes`` (non-empty) given their weighted total ``scores``."""
        ...


@runtime_checkable
class Decider(Protocol):
    # Whether a dedicated decode node prefills a request itself when no prefill node is available.
    prefills_on_decode: bool

    def decide(self, ctx: RequestContext, decode: NodeView, pick_prefill: PickPrefill) -> Placement:
        """Whether and where to prefill, given the decode profile's pick (llm-d's P/D decider).

        ``pick_prefill`` runs the prefill profile only when called. Raising ``PdorchError(NO_WORKER)``
        makes the request wait in admission.
        """
        ...


@runtime_checkable
class Profiles(Protocol):
    """What a profile handler may run: the configured profiles and decider (the placer provides it)."""

    @property
    def decider(self) -> Decider: ...

    def select(self, pool: Pool, ctx: RequestContext, nodes: Sequence[NodeView]) -> NodeView | None:
        """Run ``pool``'s whole profile (filters, scorers, picker); None when the filters leave nothing."""
        ...

    def candidates(self, pool: Pool, ctx: RequestContext, nodes: Sequence[NodeView]) -> Sequence[NodeView]:
        """Run only ``pool``'s filters."""
        ...

    def scores(self, pool: Pool, ctx: RequestContext, nodes: Sequence[NodeView]) -> list[float]:
        """Run only ``pool``'s scorers: each node's weighted total."""
        ...


@runtime_checkable
class ProfileHandler(Protocol):
    # Whether the planner may take its decisions on a sample of a large cluster's nodes first
    # (scheduler/placement/sample.py): its placements must tell a pool short of room (the slo
    # handler's tiers do; the pd handler's decider keeps requests local on purpose).
    samples: bool

    def place(
        self, profiles: Profiles, ctx: RequestContext, nodes: Sequence[NodeView], latency: LatencyTable
    ) -> Placement:
        """Where the request runs (llm-d's profile handler). ``PdorchError(NO_WORKER)`` makes it wait
        in admission; ``PdorchError(QUEUE_FULL)`` sheds it."""
        ...

    def decode_prefills(self, decider: Decider) -> bool:
        """Whether a decode node may prefill a request itself (with ``decider``, for a handler that
        runs one), so that a cluster with no prefill worker still serves."""
        ...
