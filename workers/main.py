"""``pdorch worker``: an agent beside one engine."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
import socket
from types import MappingProxyType
from typing import cast

from transport import sockets
from transport.errors import ErrorCode, PdorchError
from transport.kv import KvReceiver, KvSender
from transport.kv.receiver import ReceiverLimits
from transport.kv.same_host import SameHostMode
from transport.messages import Role
from transport.process_setup import setup_process
from transport.security import Security, SecurityConfig
from transport.security import config as security_config
from workers.agent import Agent, AgentConfig
from workers.engines import in_process_cli
from workers.engines.engine_cli import DEFAULT_ACCELERATOR, AgentParts, EngineCli

log = logging.getLogger("pdorch.worker")

# --engine NAME -> the engine package's cli module (its flags and its build; see engine_cli.py).
ENGINES = MappingProxyType(
    {
        "reference": "workers.engines.reference.cli",
        "vllm": "workers.engines.vllm.cli",
        "sim": "workers.engines.sim.cli",
    }
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", default="tcp://127.0.0.1:5555", help="scheduler control endpoint")
    p.add_argument(
        "--role", choices=[r.value for r in Role], default="both", help="what jobs this worker takes"
    )
    p.add_argument("--engine", choices=list(ENGINES), default="reference")
    p.add_argument(
        "--worker-id",
        default=os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
        help="unique worker id (default: $POD_NAME, else host-pid)",
    )
    p.add_argument(
        "--accelerator",
        default=DEFAULT_ACCELERATOR,
        help="accelerator class label (e.g. H100, A100, L40S, cpu; sim: the class modeled)",
    )
    p.add_argument(
        "--kv-bind",
        default="tcp://127.0.0.1:0",
        help="KV endpoint to bind for receiving KV (reference and sim engines, every role); port 0 picks one",
    )
    p.add_argument(
        "--kv-advertise",
        default="",
        help="KV endpoint to tell the scheduler (default: the bound one; set it behind NAT/pods)",
    )
    p.add_argument(
        "--kv-same-host",
        type=SameHostMode,
        choices=list(SameHostMode),
        default=SameHostMode.AUTO,
        help="p2p KV through shared memory when prefill and decode share a host: auto (when both "
        "report the same host), on (always; a handoff that cannot fails), off (always TCP)",
    )
    p.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="label reported to the scheduler"
    )
    add_kv_limit_arguments(p)
    p.add_argument(
        "--lora-root",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory LoRA adapters may be loaded from at run time, through the scheduler's "
        "/v1/load_lora_adapter (repeatable; none: run-time loading is off)",
    )
    p.add_argument("--log-level", default="INFO")
    security_config.add_arguments(p)
    in_process_cli.add_arguments(p.add_argument_group(in_process_cli.TITLE))
    for name in ENGINES:
        _engine_cli(name).add_arguments(p.add_argument_group(f"{name} engine"))


def _engine_cli(name: str) -> EngineCli:
    return cast(EngineCli, importlib.import_module(ENGINES[name]))


def _labels(raw: list[str]) -> dict[str, str]:
    labels = {}
    for item in raw:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PdorchError(ErrorCode.CONFIG, f"--label {item!r} must look like KEY=VALUE")
        labels[key] = value
    return labels


def add_kv_limit_arguments(p: argparse.ArgumentParser) -> None:
    """The KV endpoint's bounds (``ReceiverLimits``), read back by :func:`receiver_limits`."""
    limits = ReceiverLimits()
    for flag, default, what in (
        ("--kv-max-active", limits.max_active, "KV transfers received at once"),
        ("--kv-max-waiting", limits.max_parked, "KV transfers waiting for their decode job, in all"),
        ("--kv-max-waiting-per-connection", limits.max_parked_per_peer, "... of them from one connection"),
        ("--kv-max-waiting-per-key", limits.max_parked_per_scope, "... of them from one authenticated key"),
    ):
        p.add_argument(flag, type=int, default=default, metavar="N", help=f"{what} (default {default})")
    p.add_argument(
        "--kv-wait-s",
        type=float,
        default=limits.park_s,
        help=f"how long a KV transfer may wait for its decode job (default {limits.park_s:g})",
    )
    p.add_argument(
        "--kv-idle-s",
        type=float,
        default=limits.idle_s,
        help=f"a KV transfer silent this long is failed (default {limits.idle_s:g})",
    )


def receiver_limits(args: argparse.Namespace) -> ReceiverLimits:
    """The KV endpoint's bounds from the ``--kv-*`` flags (CONFIG error if one is not positive)."""
    return ReceiverLimits(
        max_active=args.kv_max_active,
        max_parked=args.kv_max_waiting,
        max_parked_per_peer=args.kv_max_waiting_per_connection,
        max_parked_per_scope=args.kv_max_waiting_per_key,
        park_s=args.kv_wait_s,
        idle_s=args.kv_idle_s,
    )


def advertised_kv_endpoint(role: Role, advertise: str, bound: str | None) -> str:
    """The KV endpoint the worker tells the scheduler, only where KV can arrive: its own receiver
    (``bound``: what it bound; None: it has none), or, for an engine whose connector receives the KV
    itself (vLLM), a decode-capable role. "" for a vLLM prefill worker: placement lends a prefill
    worker to decoding a prompt prefilled elsewhere only if it advertises one."""
    if bound is None and role not in (Role.DECODE, Role.BOTH):
        return ""
    return advertise or bound or ""


async def _serve(args: argparse.Namespace, security_cfg: SecurityConfig) -> int:
    security = Security.load(security_cfg)
    ctx = sockets.new_context()
    role = Role(args.role)
    sender = receiver = None
    engine_cli = _engine_cli(args.engine)
    try:
        if engine_cli.MOVES_KV:
            # Engines that move their KV in this process get the KV plane for their role.
            if role in (Role.PREFILL, Role.BOTH):
                sender = KvSender(ctx, security=security, same_host=args.kv_same_host)
            # Every role receives: a prefill worker may be lent to decoding a request that another
            # prefill worker prefilled (placement.md, the third tier).
            receiver = KvReceiver(
                ctx,
                bind=args.kv_bind,
                security=security,
                same_host=args.kv_same_host,
                **receiver_limits(args).kwargs(),
            )
            await receiver.start()
        engine = engine_cli.build(args, AgentParts(ctx, security, sender, receiver))
        kv_endpoint = advertised_kv_endpoint(role, args.kv_advertise, receiver.endpoint if receiver else None)
        cfg = AgentConfig(
            scheduler=args.scheduler,
            worker_id=args.worker_id,
            role=role,
            accelerator=engine_cli.accelerator(args),
            kv_endpoint=kv_endpoint,
            labels=_labels(args.label),
            lora_roots=args.lora_root,
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
        return await Agent(cfg, engine, ctx, security=security, kv_receiver=receiver).run(stop)
    finally:
        for part in (sender, receiver):
            if part is not None:
                with contextlib.suppress(Exception):
                    await part.close()
        security.close()
        ctx.term()


def main(args: argparse.Namespace) -> int:
    setup_process(args.log_level)
    try:
        security_cfg = security_config.from_args(args)
        return asyncio.run(_serve(args, security_cfg))
    except PdorchError as e:
        log.error("%s", e.message)
        return 2
