"""Operations endpoints: /health, /ready, /metrics, /v1/cluster."""

from __future__ import annotations

import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from scheduler.app_keys import ADMISSION, CLUSTER, CONFIG, KUBERNETES, METRICS, PLANNER
from scheduler.http.json_body import json_response
from scheduler.node_view import kv_refusing
from scheduler.prediction.latency import SPEED_KINDS
from transport.messages import Role


async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Ready while requests can be served: as admission judges it (a prefill and a decode worker, or
    a worker the placement runs whole requests on)."""
    app = request.app
    cluster = app[CLUSTER]
    prefill, decode = cluster.has_role(Role.PREFILL), cluster.has_role(Role.DECODE)
    ready = cluster.can_serve(app[CONFIG].colocated, app[PLANNER].placer.whole_request_roles)
    body = {"ready": ready, "prefill_workers": prefill, "decode_workers": decode}
    return json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    payload = generate_latest(request.app[METRICS].registry)
    return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def cluster(request: web.Request) -> web.Response:
    cfg, admission, directory = request.app[CONFIG], request.app[ADMISSION], request.app[CLUSTER]
    now = time.monotonic()
    speeds = request.app[PLANNER].latency.speed_factors()
    workers = []
    for w in directory.workers():
        h = w.hello
        workers.append(
            {
                "worker_id": h.worker_id,
                "role": str(h.role),
                "state": str(w.state),
                "engine": h.engine,
                "model": h.model,
                "accelerator": h.accelerator,
                "kv_endpoint": h.kv_endpoint,
                # As placement sees it: reported by the worker, or a handoff to it turned away.
                "kv_refusing": kv_refusing(w.load, w.ledger, now),
                # Its KV network is taken as down (handoffs with two or more peers lately did not
                # land): left out while it backs off. And the workers whose handoffs to it did not.
                "kv_unreachable": w.ledger.kv_path.open(now),
                "kv_unreachable_from": sorted(w.ledger.kv_unreachable_from(now)),
                "key": w.key_name,
                "block_size": h.block_size,
                "kv_bytes_per_token": h.kv_bytes_per_token,
                "last_seen_s": round(now - w.liveness.last_seen, 3),
                "load": {
                    "blocks_used": w.load.blocks_used,
                    "blocks_total": w.load.blocks_total or h.capacity_blocks,
                    "blocks_reserved": w.reserved_blocks,
                    "running": w.load.running,
                    "waiting": w.load.waiting,
                    "queued_prefill_tokens": w.load.queued_prefill_tokens,
                    "decoded_tokens": w.load.decoded_tokens,
                },
                "adapters": h.adapters,
                "adapter_slots": w.load.adapter_slots,
                "adapters_resident": w.load.adapters_resident,
                "inflight_requests": len(w.requests),
                "labels": h.labels,
                # How long its prefills and decode steps take against its class's typical node, as
                # placement has learnt it (absent until it has been seen working).
                "speed_factor": dict(zip(SPEED_KINDS, speeds[h.worker_id], strict=True))
                if h.worker_id in speeds
                else None,
            }
        )
    expected = {pool: sorted(ids) for pool, ids in directory.expected().items()}
    autoscaler = request.app[KUBERNETES].autoscaler
    scaling = (
        {}
        if autoscaler is None
        else {
            pool: {"current": d.current, "desired": d.desired, "reason": d.reason}
            for pool, d in autoscaler.last_decisions().items()
        }
    )
    return json_response(
        {
            "kv_mode": "colocated" if cfg.colocated else cfg.kv_mode,
            "workers": workers,
            "expected": expected,
            "autoscaler": scaling,
            "admission": {"running": admission.inflight, "queued": admission.queued},
        }
    )
