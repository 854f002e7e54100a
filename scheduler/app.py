"""Composition root: builds the scheduler's aiohttp app and runs it.

The pure parts (config, metrics, request inboxes, cluster state, admission, planner) are built with
the app. Each resource that must be started and stopped has a cleanup context of its own, added in
dependency order: the tokenizer registry (a temporary directory), the ZeroMQ context, the control
plane (with the orchestrator, which sends through it), the Kubernetes runtime. aiohttp stops them in
reverse order, and only those that started. Everything is reached through the typed keys of
``app_keys.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from scheduler.admission.gate import AdmissionGate
from scheduler.app_keys import (
    ADAPTERS,
    ADMISSION,
    CLUSTER,
    CONFIG,
    CONNECTIONS,
    INBOX,
    KUBERNETES,
    METRICS,
    ORCHESTRATOR,
    PLANNER,
    SECURITY,
    TOKENIZERS,
    ZMQ_CONTEXT,
)
from scheduler.cluster import Cluster
from scheduler.config import SchedulerConfig, load_config
from scheduler.control import ControlServer
from scheduler.flow import Orchestrator
from scheduler.http import lora, openai, openapi, ops
from scheduler.http.connection_limits import ConnectionLimits, request_heads
from scheduler.http.errors import error_middleware
from scheduler.http.server import serve
from scheduler.inbox import Inbox
from scheduler.kubernetes.runtime import kubernetes_runtime
from scheduler.kv_broker_monitor import KvBrokerMonitor
from scheduler.lora.operations import AdapterOperations
from scheduler.metrics import Metrics
from scheduler.placement.framework import Placer
from scheduler.planner import Planner
from scheduler.pool_signals import pool_signals
from scheduler.prediction.latency import SPEED_KINDS, LatencyLearner
from scheduler.prediction.output_length import OutputLengthPredictor
from scheduler.tokenizer.registry import TokenizerRegistry
from transport import sockets
from transport.errors import PdorchError
from transport.messages import KvMode
from transport.process_setup import setup_process
from transport.security import KeyKind, Plane, Security

log = logging.getLogger("pdorch.scheduler")


def build_app(cfg: SchedulerConfig) -> web.Application:
    app = web.Application(middlewares=[request_heads, error_middleware], client_max_size=cfg.max_body_bytes)
    app.router.add_post("/v1/completions", openai.completions)
    app.router.add_post("/v1/chat/completions", openai.chat_completions)
    app.router.add_get("/v1/models", openai.models)
    app.router.add_get("/v1/models/{model_id:.+}", openai.model)
    app.router.add_post("/v1/load_lora_adapter", lora.load_lora_adapter)
    app.router.add_post("/v1/unload_lora_adapter", lora.unload_lora_adapter)
    app.router.add_post("/tokenize", openai.tokenize)
    app.router.add_post("/detokenize", openai.detokenize)
    app.router.add_get("/v1/cluster", ops.cluster)
    app.router.add_get("/health", ops.health)
    app.router.add_get("/ready", ops.ready)
    app.router.add_get("/metrics", ops.metrics)
    app.router.add_get("/openapi.json", openapi.openapi)
    _add_pure_parts(app, cfg)
    app.cleanup_ctx.extend(
        [tokenizer_registry, zmq_context, security, control_plane, kv_broker_monitor, kubernetes]
    )
    return app


def _add_pure_parts(app: web.Application, cfg: SchedulerConfig) -> None:
    """What holds no socket, task or file: built once, before the app starts."""
    inbox = Inbox()
    admission = AdmissionGate(cfg.admission)
    cluster = Cluster(
        heartbeat_interval_s=cfg.heartbeat_interval_s,
        heartbeat_liveness=cfg.heartbeat_liveness,
        on_lost=inbox.workers_lost,
    )
    placer = Placer(cfg.placement, clock=time.perf_counter)
    metrics = Metrics(cfg.slo)
    metrics.bind_gauge(
        "pdorch_requests_running",
        "Requests admitted and not finished, as sequences (a request's n choices count n)",
        lambda: admission.inflight,
    )
    metrics.bind_gauge("pdorch_requests_queued", "Requests waiting for admission", lambda: admission.queued)
    metrics.bind_gauge("pdorch_workers", "Registered workers", lambda: len(cluster.workers()))
    metrics.bind_gauge("pdorch_workers_dropped", "Workers dropped since start", lambda: cluster.dropped_total)
    metrics.watch_placement(placer)
    connections = ConnectionLimits(
        cfg.http.max_connections_per_client,
        cfg.http.max_connections,
        cfg.http.header_timeout_s,
        cfg.http.write_stall_timeout_s,
    )
    metrics.bind_gauge("pdorch_http_connections", "Open HTTP connections", lambda: connections.open)
    metrics.bind_gauge(
        "pdorch_http_stalled_connections",
        "HTTP connections aborted since start because their client read nothing of the answer for "
        "http.write_stall_timeout_s",
        lambda: connections.stalled,
    )
    metrics.bind_counts(
        "pdorch_http_connections_refused",
        "HTTP connections refused at once: per_client (too many from one address) or total",
        "limit",
        lambda: connections.refused,
    )
    app[CONNECTIONS] = connections
    app[CONFIG] = cfg
    app[METRICS] = metrics
    app[INBOX] = inbox
    app[CLUSTER] = cluster
    app[ADMISSION] = admission
    app[ADAPTERS] = AdapterOperations(cluster, timeout_s=cfg.lora.timeout_s, colocated=cfg.colocated)
    latency = LatencyLearner(placer.config.accelerators)
    metrics.bind_levels(
        "pdorch_placement_tpot_margin",
        "Share of the TPOT objective placement keeps in reserve, learnt per node class (0: its TPOT "
        "predictions hold)",
        "node_class",
        latency.tpot_margins,
    )
    metrics.bind_levels(
        "pdorch_worker_decode_step_seconds",
        "Seconds per decode step each worker took lately, from the tokens it reports decoded (what "
        "placement learns its decode model from)",
        "worker",
        cluster.ledger.decode_steps,
    )
    for i, kind in enumerate(SPEED_KINDS):
        metrics.bind_levels(
            f"pdorch_worker_{kind}_speed_factor",
            f"How long each worker's {kind} takes against its node class's typical worker, as placement "
            "has learnt it (above 1: slower; a degraded GPU shows here)",
            "worker",
            lambda i=i: {w: f[i] for w, f in latency.speed_factors().items()},
        )
    app[PLANNER] = planner = Planner(
        cluster,
        cluster.ledger,
        placer,
        OutputLengthPredictor(cfg.predictor),
        latency,
        colocated=cfg.colocated,
    )
    metrics.bind_counts(
        "pdorch_placement_scope",
        "Placement decisions by the nodes they looked at: sample (placement.sample of each pool and "
        "class, and the prefix's holders), all (a small cluster, or the sample could not take the "
        "request within its own pools)",
        "scope",
        lambda: planner.scope,
    )


async def tokenizer_registry(app: web.Application) -> AsyncIterator[None]:
    """The tokenizers requests are encoded with, and the temporary directory of the files workers ship."""
    app[TOKENIZERS] = tokenizers = TokenizerRegistry()
    yield
    tokenizers.close()


async def zmq_context(app: web.Application) -> AsyncIterator[None]:
    app[ZMQ_CONTEXT] = ctx = sockets.new_context()
    yield
    ctx.term()  # returns once every socket of the context is closed


async def security(app: web.Application) -> AsyncIterator[None]:
    """The keys of the ZeroMQ planes, and the ZAP handler that admits peers (stopped before the
    ZeroMQ context ends, which waits for its socket)."""
    app[SECURITY] = keys = Security.load(app[CONFIG].security)
    app[METRICS].bind_gauge(
        "pdorch_zmq_refused_handshakes",
        "ZeroMQ handshakes refused: unknown or unauthorized keys",
        lambda: keys.refused_handshakes,
    )
    try:
        yield
    finally:
        keys.close()


async def control_plane(app: web.Application) -> AsyncIterator[None]:
    """The workers' ROUTER socket and its tasks, and the orchestrator that sends jobs through it."""
    cfg, cluster, inbox, admission, metrics = (
        app[CONFIG],
        app[CLUSTER],
        app[INBOX],
        app[ADMISSION],
        app[METRICS],
    )
    control = ControlServer(
        app[ZMQ_CONTEXT],
        bind=cfg.control_bind,
        security=app[SECURITY],
        cluster=cluster,
        inbox=inbox,
        heartbeat_interval_s=cfg.heartbeat_interval_s,
        heartbeat_liveness=cfg.heartbeat_liveness,
        on_capacity=admission.notify,
        on_tokenizer=app[TOKENIZERS].provide,
        on_joined=app[ADAPTERS].joined,
        on_adapter_ack=app[ADAPTERS].acked,
    )
    app[ADAPTERS].bind(control.send)
    try:  # the socket is bound: close it even if starting fails, or the ZeroMQ context never ends
        metrics.bind_gauge(
            "pdorch_control_bad_messages", "Malformed control messages dropped", lambda: control.bad_messages
        )
        metrics.bind_counts(
            "pdorch_control_refused_registrations",
            "Hellos refused, by code (unauthorized: the key may not claim the worker id; "
            "identity_in_use: another live connection holds it)",
            "code",
            lambda: control.refused,
        )
        metrics.bind_gauge(
            "pdorch_control_late_messages",
            "Worker messages for jobs that were over (finished, cancelled, or moved to other workers)",
            lambda: inbox.dropped,
        )
        app[ORCHESTRATOR] = Orchestrator(
            cfg,
            cluster,
            control,
            inbox,
            app[PLANNER],
            metrics,
            admission.notify,
            kv_broker_key=_broker_key(app[SECURITY], cfg),
        )
        await control.start()
        log.info("control plane on %s", control.endpoint)
        yield
    finally:
        await control.close()


async def kv_broker_monitor(app: web.Application) -> AsyncIterator[None]:
    """Centralized mode: the watch on the KV broker, which tells the orchestrator when handoffs
    through it are lost and whether to send new ones there."""
    cfg, orchestrator = app[CONFIG], app[ORCHESTRATOR]
    if cfg.kv_mode is not KvMode.CENTRALIZED or cfg.colocated:
        yield
        return
    keys = app[SECURITY]
    monitor = KvBrokerMonitor(
        app[ZMQ_CONTEXT],
        cfg.kv_broker,
        auth=keys.client(Plane.KV, keys.server_key(KeyKind.KV_BROKER)),
        interval_s=cfg.heartbeat_interval_s,
        liveness=cfg.heartbeat_liveness,
        on_lost=orchestrator.broker_lost,
    )
    orchestrator.broker.reachable = lambda: monitor.reachable
    app[METRICS].bind_gauge(
        "pdorch_kv_broker_losses",
        "Times the KV broker stopped answering or restarted (once per outage)",
        lambda: monitor.losses,
    )
    await monitor.start()
    try:
        yield
    finally:
        await monitor.close()


def _broker_key(keys: Security, cfg: SchedulerConfig) -> str:
    """The broker's public key, which every KV connection to it pins ("" when not needed)."""
    if cfg.kv_mode is not KvMode.CENTRALIZED or cfg.colocated:
        return ""
    return keys.server_key(KeyKind.KV_BROKER)


async def kubernetes(app: web.Application) -> AsyncIterator[None]:
    """Pod discovery and the autoscaler, when the config enables them."""
    cfg, cluster, admission = app[CONFIG], app[CLUSTER], app[ADMISSION]
    async with kubernetes_runtime(
        cfg.kubernetes, cluster, lambda pool: pool_signals(cluster, admission, app[METRICS].slo, pool)
    ) as runtime:
        app[KUBERNETES] = runtime
        yield


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
    setup_process(args.log_level)
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
    # A client that hangs up cancels its request (handler_cancellation), which cancels its jobs.
    try:
        asyncio.run(serve(build_app(cfg), cfg))
    except PdorchError as e:  # keys that do not load
        log.error("%s", e.message)
        return 2
    return 0
