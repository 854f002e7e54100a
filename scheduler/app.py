"""Composition root: builds the scheduler's aiohttp app and runs it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import zmq.asyncio
from aiohttp import web

from scheduler.admission.gate import AdmissionGate
from scheduler.cluster import Cluster
from scheduler.config import SchedulerConfig, load_config
from scheduler.control import ControlServer
from scheduler.flow import Orchestrator
from scheduler.http import openai, ops
from scheduler.http.errors import error_middleware
from scheduler.inbox import Inbox
from scheduler.kubernetes.runtime import kubernetes_runtime
from scheduler.metrics import Metrics
from scheduler.placement.framework import Placer
from scheduler.planner import Planner
from scheduler.pool_signals import pool_signals
from scheduler.prediction.output_length import OutputLengthPredictor
from scheduler.state import STATE, SchedulerState
from scheduler.tokenizer.registry import TokenizerRegistry
from transport.errors import PdorchError

log = logging.getLogger("pdorch.scheduler")


def build_app(cfg: SchedulerConfig) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=cfg.max_body_bytes)
    app.router.add_post("/v1/completions", openai.completions)
    app.router.add_post("/v1/chat/completions", openai.chat_completions)
    app.router.add_get("/v1/models", openai.models)
    app.router.add_get("/v1/cluster", ops.cluster)
    app.router.add_get("/health", ops.health)
    app.router.add_get("/ready", ops.ready)
    app.router.add_get("/metrics", ops.metrics)

    async def wiring(app: web.Application) -> AsyncIterator[None]:
        ctx = zmq.asyncio.Context()
        metrics = Metrics(cfg.slo)
        inbox = Inbox()
        admission = AdmissionGate(cfg.admission)
        tokenizers = TokenizerRegistry()
        cluster = Cluster(
            heartbeat_interval_s=cfg.heartbeat_interval_s,
            heartbeat_liveness=cfg.heartbeat_liveness,
            on_lost=inbox.workers_lost,
        )
        control = ControlServer(
            ctx,
            bind=cfg.control_bind,
            cluster=cluster,
            inbox=inbox,
            heartbeat_interval_s=cfg.heartbeat_interval_s,
            heartbeat_liveness=cfg.heartbeat_liveness,
            on_capacity=admission.notify,
            on_tokenizer=tokenizers.provide,
            token=cfg.control_token,
        )
        placer = Placer(cfg.placement, clock=time.perf_counter)
        planner = Planner(cluster, placer, OutputLengthPredictor(cfg.predictor), colocated=cfg.colocated)
        orchestrator = Orchestrator(cfg, cluster, control, inbox, planner, metrics, admission.notify)
        metrics.bind_gauge(
            "pdorch_requests_running", "Requests admitted and not finished", lambda: admission.inflight
        )
        metrics.bind_gauge(
            "pdorch_requests_queued", "Requests waiting for admission", lambda: admission.queued
        )
        metrics.bind_gauge("pdorch_workers", "Registered workers", lambda: len(cluster.workers()))
        metrics.bind_gauge(
            "pdorch_workers_dropped", "Workers dropped since start", lambda: cluster.dropped_total
        )
        metrics.bind_gauge(
            "pdorch_control_bad_messages", "Malformed control messages dropped", lambda: control.bad_messages
        )
        metrics.watch_placement(placer)
        app[STATE] = SchedulerState(
            cfg, cluster, control, orchestrator, admission, planner, tokenizers, metrics
        )
        await control.start()
        log.info("control plane on %s", control.endpoint)
        try:
            async with kubernetes_runtime(
                cfg.kubernetes, cluster, lambda pool: pool_signals(cluster, admission, metrics.slo, pool)
            ) as k8s:
                app[STATE].kubernetes = k8s
                yield
        finally:
            await control.close()
            ctx.term()
            tokenizers.close()

    app.cleanup_ctx.append(wiring)
    return app


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (keys as in scheduler/config.py)")
    p.add_argument("--host", help="HTTP listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--control-bind", help="ZeroMQ control endpoint to bind (default tcp://127.0.0.1:5555)")
    p.add_argument("--kv-mode", choices=["p2p", "centralized"], help="KV handoff mode (default p2p)")
    p.add_argument("--kv-broker", help="KV broker endpoint (centralized mode)")
    p.add_argument("--colocated", action="store_true", default=None, help="serve each request on one worker")
    p.add_argument("--log-level", default="INFO")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = load_config(
            args.config,
            overrides={
                "host": args.host,
                "port": args.port,
                "control_bind": args.control_bind,
                "kv_mode": args.kv_mode,
                "kv_broker": args.kv_broker,
                "colocated": args.colocated,
            },
        )
    except PdorchError as e:
        log.error("%s", e.message)
        return 2
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    # handler_cancellation: a client that hangs up cancels its request, which cancels its jobs.
    web.run_app(
        build_app(cfg), host=cfg.host, port=cfg.port, handler_cancellation=True, print=None, access_log=None
    )
    return 0
