"""``pdorch worker --engine reference``: the reference engine's flags, and the engine built from them.

It also reads the flags of ``workers/engines/in_process_cli.py`` (model name, KV blocks, batching).
"""

from __future__ import annotations

import argparse

from transport.errors import ErrorCode, PdorchError
from workers.engines.base import Engine
from workers.engines.engine_cli import AgentParts

MOVES_KV = True


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--weights",
        default="",
        help="serve this Llama GGUF file or Hugging Face Llama directory as --model "
        "(default: the weights --model names; pdorch-reference: seeded random weights)",
    )
    group.add_argument(
        "--dtype",
        choices=["float64", "float32"],
        default="float64",
        help="compute dtype; float64 keeps a request's tokens independent of batching (default)",
    )
    group.add_argument("--max-model-len", type=int, default=0, help="context length cap (0: the model's)")
    group.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache size in GiB (default 1)")
    group.add_argument(
        "--num-blocks", type=int, default=0, help="KV cache size in blocks (overrides the GiB)"
    )
    group.add_argument("--model-seed", type=int, default=0, help="weight seed of the random-weight model")
    group.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="serve the LoRA adapter in PEFT directory DIR as NAME (repeatable)",
    )
    group.add_argument(
        "--max-loras", type=int, default=4, help="LoRA adapters resident at once (LRU beyond; default 4)"
    )


def build(args: argparse.Namespace, parts: AgentParts) -> Engine:
    from workers.engines.reference.engine import ReferenceEngine
    from workers.engines.reference.model_choice import choose_model

    chosen = choose_model(
        args.model, args.weights, dtype=args.dtype, seed=args.model_seed, max_model_len=args.max_model_len
    )
    bytes_per_block = args.block_size * chosen.config.kv_bytes_per_token
    num_blocks = args.num_blocks or max(1, int(args.kv_cache_gib * (1 << 30)) // bytes_per_block)
    return ReferenceEngine(
        chosen.config,
        weights=chosen.weights,
        tokenizer=chosen.tokenizer,
        model_name=args.model,
        num_blocks=num_blocks,
        block_size=args.block_size,
        max_batch=args.max_batch,
        max_prefill_tokens_per_step=args.max_prefill_tokens,
        enable_prefix_caching=not args.no_prefix_caching,
        kv_sender=parts.kv_sender,
        kv_receiver=parts.kv_receiver,
        adapters=_adapters(args.lora),
        max_loras=args.max_loras,
    )


def _adapters(specs: list[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise PdorchError(ErrorCode.CONFIG, f"--lora takes NAME=DIR, got {spec!r}")
        out[name] = path
    return out


def accelerator(args: argparse.Namespace) -> str:
    return args.accelerator
