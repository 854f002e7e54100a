"""``pdorch worker --engine vllm``: the agent beside a vLLM server; its flags, and the engine built
from them. Nothing vLLM-specific is imported until ``build``."""

from __future__ import annotations

import argparse

from workers.engines.base import Engine
from workers.engines.engine_cli import AgentParts

# vLLM's KV moves inside vLLM, through pdorch's connector, not through the agent's process.
MOVES_KV = False


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--vllm-url", default="http://127.0.0.1:8100", help="the vLLM server beside this agent"
    )
    group.add_argument(
        "--model-dir", default=None, help="model directory (its tokenizer goes to the scheduler)"
    )
    group.add_argument(
        "--vllm-kv-arrival-notes",
        default="",
        metavar="ENDPOINT",
        help="endpoint (ipc:// or loopback tcp://) to bind for the decode vLLM's notes that a "
        "request's KV is arriving (its connector's pdorch_kv_arrival_notes), so a long handoff that "
        'keeps moving is not taken for stalled; "" (default): none',
    )


def build(args: argparse.Namespace, parts: AgentParts) -> Engine:
    from workers.engines.vllm.engine import VllmEngine
    from workers.engines.vllm.kv_arrivals import ArrivalListener

    notes = args.vllm_kv_arrival_notes
    arrivals = ArrivalListener(parts.ctx, notes, parts.security) if notes else None
    return VllmEngine(args.vllm_url, model_dir=args.model_dir, arrivals=arrivals)


def accelerator(args: argparse.Namespace) -> str:
    return args.accelerator
