"""What the HTTP handlers share, behind one typed aiohttp AppKey."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from scheduler.admission.gate import AdmissionGate
from scheduler.cluster import Cluster
from scheduler.config import SchedulerConfig
from scheduler.control import ControlServer
from scheduler.flow import Orchestrator
from scheduler.kubernetes.runtime import KubernetesRuntime
from scheduler.metrics import Metrics
from scheduler.planner import Planner
from scheduler.tokenizer.registry import TokenizerRegistry


@dataclass
class SchedulerState:
    cfg: SchedulerConfig
    cluster: Cluster
    control: ControlServer
    orchestrator: Orchestrator
    admission: AdmissionGate
    planner: Planner
    tokenizers: TokenizerRegistry
    metrics: Metrics
    kubernetes: KubernetesRuntime | None = None


STATE = web.AppKey("state", SchedulerState)
