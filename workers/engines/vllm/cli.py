"""``pdorch worker --engine vllm``: the agent beside a vLLM server; its flags, and the engine built
from them. Nothing vLLM-specific is imported until ``build``."""

from __future__ import annotations

import argparse

from transport.kv import KvReceiver, KvSender
from workers.engines.base import Engine

# vLLM's KV moves inside vLLM, through pdorch's connector, not through the agent's process.
MOVES_KV = False


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--vllm-url", default="http://127.0.0.1:8100", help="the vLLM server beside this agent"
    )
    group.add_argument(
        "--model-dir", default=None, help="model directory (its tokenizer goes to the scheduler)"
    )


def build(args: argparse.Namespace, kv_sender: KvSender | None, kv_receiver: KvReceiver | None) -> Engine:
    from workers.engines.vllm.engine import VllmEngine

    return VllmEngine(args.vllm_url, model_dir=args.model_dir)


def accelerator(args: argparse.Namespace) -> str:
    return args.accelerator
