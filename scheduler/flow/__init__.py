"""One request's lifecycle, its failure edges and its migration to other workers."""

from scheduler.flow.orchestrator import Orchestrator
from scheduler.flow.request import GenerationRequest, TokenBatch

__all__ = ["GenerationRequest", "Orchestrator", "TokenBatch"]
