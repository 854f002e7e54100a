"""``pdorch worker``: an agent beside one engine."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket

import zmq.asyncio

from transport.errors import ErrorCode, PdorchError
from transport.kv import KvReceiver, KvSender
from transport.messages import Role
from workers.agent import Agent, AgentConfig
from workers.engines.base import Engine

log = logging.getLogger("pdorch.worker")

# The scheduler's control_token, when it requires one (the scheduler reads the same variable).
CONTROL_TOKEN_ENV = "PDORCH_CONTROL_TOKEN"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scheduler",
        default="tcp://127.0.0.1:5555",
        help=f"scheduler control endpoint (the token it may require is read from ${CONTROL_TOKEN_ENV})",
    )
    p.add_argument(
        "--role", choices=[r.value for r in Role], default="both", help="what jobs this worker takes"
    )
    p.add_argument("--engine", choices=["reference", "vllm", "sim"], default="reference")
    p.add_argument(
        "--worker-id",
        default=os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
        help="unique worker id (default: $POD_NAME, else host-pid)",
    )
    p.add_argument(
        "--model", default="pdorch-reference", help="model name the worker serves (reference engine)"
    )
    p.add_argument(
        "--accelerator", default="cpu", help="accelerator class label (e.g. H100, A100, L40S, cpu)"
    )
    p.add_argument(
        "--kv-bind",
        default="tcp://127.0.0.1:0",
        help="KV endpoint to bind for receiving KV (decode-capable roles); port 0 picks one",
    )
    p.add_argument(
        "--kv-advertise",
        default="",
        help="KV endpoint to tell the scheduler (default: the bound one; set it behind NAT/pods)",
    )
    p.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="label reported to the scheduler"
    )
    # Reference engine.
    p.add_argument("--num-blocks", type=int, default=4096, help="KV cache size in blocks (reference engine)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (reference engine)")
    p.add_argument(
        "--max-batch", type=int, default=64, help="max sequences per decode step (reference engine)"
    )
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=512,
        help="prompt tokens prefilled per engine step; longer prompts are chunked (reference engine)",
    )
    p.add_argument(
        "--no-prefix-caching", action="store_true", help="disable prefix caching (reference engine)"
    )
    p.add_argument("--model-seed", type=int, default=0, help="weight seed of the reference model")
    # vLLM engine.
    p.add_argument("--vllm-url", default="http://127.0.0.1:8100", help="the vLLM server beside this agent")
    p.add_argument(
        "--model-dir", default=None, help="model directory (vLLM engine: tokenizer for the scheduler)"
    )
    # Simulated engine (load tests: timing and KV sizes of a real model on a real accelerator class).
    p.add_argument(
        "--sim-accelerator", default="h100", help="accelerator class modeled: a100, h100, l40s (sim)"
    )
    p.add_argument("--sim-tp", type=int, default=2, help="tensor-parallel devices modeled: 2, 4 or 8 (sim)")
    p.add_argument(
        "--sim-model", default="llama-3-8b", help="model shape modeled: llama-3-8b, llama-2-70b (sim)"
    )
    p.add_argument(
        "--sim-time-scale",
        type=float,
        default=1.0,
        help="multiplies modeled durations; 0.1 = 10x faster (sim)",
    )
    p.add_argument(
        "--sim-kv-link-gbytes-per-s",
        type=float,
        default=25.0,
        help="modeled KV link bandwidth per worker (sim)",
    )
    p.add_argument("--sim-num-blocks", type=int, default=0, help="KV blocks; 0 = from device memory (sim)")
    p.add_argument("--sim-max-model-len", type=int, default=0, help="context length; 0 = the model's (sim)")
    p.add_argument(
        "--sim-mean-output-tokens", type=float, default=256.0, help="mean output length (EOS draw rate) (sim)"
    )
    p.add_argument("--sim-seed", type=int, default=0, help="seed of the simulated outputs (sim)")
    p.add_argument("--log-level", default="INFO")


def _labels(raw: list[str]) -> dict[str, str]:
    labels = {}
    for item in raw:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PdorchError(ErrorCode.CONFIG, f"--label {item!r} must look like KEY=VALUE")
        labels[key] = value
    return labels


def _make_engine(args: argparse.Namespace, sender: KvSender | None, receiver: KvReceiver | None) -> Engine:
    if args.engine == "vllm":
        from workers.engines.vllm.engine import VllmEngine

        # vLLM's KV moves inside vLLM, through pdorch's connector, not through this process.
        return VllmEngine(args.vllm_url, model_dir=args.model_dir)
    if args.engine == "sim":
        from workers.engines.sim.config import SimEngineConfig
        from workers.engines.sim.engine import SimulatedEngine

        config = SimEngineConfig(
            accelerator=args.sim_accelerator,
            model=args.sim_model,
            tp=args.sim_tp,
            model_name=args.model,
            time_scale=args.sim_time_scale,
            kv_link_gbytes_per_s=args.sim_kv_link_gbytes_per_s,
            max_batch=args.max_batch,
            chunk_tokens=args.max_prefill_tokens,
            num_blocks=args.sim_num_blocks,
            block_size=args.block_size,
            max_model_len=args.sim_max_model_len,
            mean_output_tokens=args.sim_mean_output_tokens,
            enable_prefix_caching=not args.no_prefix_caching,
            seed=args.sim_seed,
        )
        return SimulatedEngine(config, kv_sender=sender, kv_receiver=receiver)
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
        kv_sender=sender,
        kv_receiver=receiver,
    )


async def _serve(args: argparse.Namespace) -> int:
    ctx = zmq.asyncio.Context()
    role = Role(args.role)
    sender = receiver = None
    try:
        if args.engine != "vllm":
            # Engines that move their KV in this process get the KV plane for their role.
            if role in (Role.PREFILL, Role.BOTH):
                sender = KvSender(ctx)
            if role in (Role.DECODE, Role.BOTH):
                receiver = KvReceiver(ctx, bind=args.kv_bind)
                await receiver.start()
        engine = _make_engine(args, sender, receiver)
        kv_endpoint = args.kv_advertise or (receiver.endpoint if receiver is not None else "")
        if args.engine == "sim" and args.accelerator == "cpu":
            args.accelerator = args.sim_accelerator  # the label placement scores: the class modeled
        cfg = AgentConfig(
            scheduler=args.scheduler,
            worker_id=args.worker_id,
            role=role,
            accelerator=args.accelerator,
            kv_endpoint=kv_endpoint,
            labels=_labels(args.label),
            # Only from the environment: a command line is visible to every local user.
            token=os.environ.get(CONTROL_TOKEN_ENV, ""),
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        log.info(
            "worker %s (%s, %s engine) -> %s; KV endpoint %s",
            cfg.worker_id,
            role,
            args.engine,
            args.scheduler,
            kv_endpoint or "-",
        )
        return await Agent(cfg, engine, ctx).run(stop)
    finally:
        for part in (sender, receiver):
            if part is not None:
                with contextlib.suppress(Exception):
                    await part.close()
        ctx.term()


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        return asyncio.run(_serve(args))
    except PdorchError as e:
        log.error("%s", e.message)
        return 2
