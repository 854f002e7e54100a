"""Workload traces for the simulator: public trace files read by their format, rate scaling.

Formats: Azure LLM inference 2023 and 2024 and BurstGPT (CSV), ShareGPT lengths (CSV, no
timestamps), Mooncake and Qwen-Bailian (JSONL); any of them gzip-compressed. None records
``max_tokens``; every request gets :data:`DEFAULT_MAX_TOKENS`.
"""

from simulate.trace.load import load_trace
from simulate.trace.types import DEFAULT_MAX_TOKENS, Trace, TraceRequest

__all__ = ["DEFAULT_MAX_TOKENS", "Trace", "TraceRequest", "load_trace"]
