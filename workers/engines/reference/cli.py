"""``pdorch worker --engine reference``: the reference engine's flags, and the engine built from them.

It also reads the flags of ``workers/engines/in_process_cli.py`` (model name, KV blocks, batching).
"""

from __future__ import annotations

import argparse

from transport.kv import KvReceiver, KvSender
from workers.engines.base import Engine

MOVES_KV = True


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--num-blocks", type=int, default=4096, help="KV cache size in blocks")
    group.add_argument("--model-seed", type=int, default=0, help="weight seed of the reference model")


def build(args: argparse.Namespace, kv_sender: KvSender | None, kv_receiver: KvReceiver | None) -> Engine:
    from workers.engines.reference.config import ModelConfig
    from workers.engines.reference.engine import ReferenceEngine

    return ReferenceEngine(
        ModelConfig(seed=args.model_seed),
        model_name=args.model,
        num_blocks=args.num_blocks,
        block_size=args.block_size,
        max_batch=args.max_batch,
        max_prefill_tokens_per_step=args.max_prefill_tokens,
        enable_prefix_caching=not args.no_prefix_caching,
        kv_sender=kv_sender,
        kv_receiver=kv_receiver,
    )


def accelerator(args: argparse.Namespace) -> str:
    return args.accelerator
