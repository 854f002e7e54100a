"""``pdorch worker --engine sim``: the simulated engine's flags, and the engine built from them.

Load tests: timing and KV sizes of a real model on a real accelerator class. The ``--sim-`` flags
say what is modeled; the flags of ``workers/engines/in_process_cli.py`` (model name, block size,
batching, prefix caching) are read as by the reference engine.
"""

from __future__ import annotations

import argparse

from workers.engines.base import Engine
from workers.engines.engine_cli import DEFAULT_ACCELERATOR, AgentParts

MOVES_KV = True


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--sim-accelerator", default="h100", help="accelerator class modeled: a100, h100, l40s"
    )
    group.add_argument("--sim-tp", type=int, default=2, help="tensor-parallel devices modeled: 2, 4 or 8")
    group.add_argument(
        "--sim-model", default="llama-3-8b", help="model shape modeled: llama-3-8b, llama-2-70b"
    )
    group.add_argument(
        "--sim-time-scale",
        type=float,
        default=1.0,
        help="multiplies modeled durations; 0.1 = 10x faster; 0 = no modeled time (a zero-cost engine)",
    )
    group.add_argument(
        "--sim-slowdown",
        type=float,
        default=1.0,
        help="every modeled compute duration times this: a degraded instance of its class (2 = half speed)",
    )
    group.add_argument(
        "--sim-kv-link-gbytes-per-s", type=float, default=25.0, help="modeled KV link bandwidth per worker"
    )
    group.add_argument("--sim-num-blocks", type=int, default=0, help="KV blocks; 0 = from device memory")
    group.add_argument("--sim-max-model-len", type=int, default=0, help="context length; 0 = the model's")
    group.add_argument(
        "--sim-mean-output-tokens", type=float, default=256.0, help="mean output length (EOS draw rate)"
    )
    group.add_argument("--sim-seed", type=int, default=0, help="seed of the simulated outputs")
    group.add_argument(
        "--sim-lora",
        action="append",
        default=[],
        metavar="NAME",
        help="a LoRA adapter served (modeled: its load costs --sim-adapter-load-s); repeatable",
    )
    group.add_argument("--sim-max-loras", type=int, default=4, help="LoRA adapters resident at once")
    group.add_argument(
        "--sim-adapter-load-s", type=float, default=0.1, help="modeled seconds per LoRA adapter load"
    )


def build(args: argparse.Namespace, parts: AgentParts) -> Engine:
    from workers.engines.sim.config import SimEngineConfig
    from workers.engines.sim.engine import SimulatedEngine

    config = SimEngineConfig(
        accelerator=args.sim_accelerator,
        model=args.sim_model,
        tp=args.sim_tp,
        model_name=args.model,
        time_scale=args.sim_time_scale,
        slowdown=args.sim_slowdown,
        kv_link_gbytes_per_s=args.sim_kv_link_gbytes_per_s,
        max_batch=args.max_batch,
        chunk_tokens=args.max_prefill_tokens,
        num_blocks=args.sim_num_blocks,
        block_size=args.block_size,
        max_model_len=args.sim_max_model_len,
        mean_output_tokens=args.sim_mean_output_tokens,
        enable_prefix_caching=not args.no_prefix_caching,
        seed=args.sim_seed,
        adapters=tuple(args.sim_lora),
        max_loras=args.sim_max_loras,
        adapter_load_s=args.sim_adapter_load_s,
    )
    return SimulatedEngine(config, kv_sender=parts.kv_sender, kv_receiver=parts.kv_receiver)


def accelerator(args: argparse.Namespace) -> str:
    """The class modeled, unless ``--accelerator`` names another label (placement scores it)."""
    return args.sim_accelerator if args.accelerator == DEFAULT_ACCELERATOR else args.accelerator
