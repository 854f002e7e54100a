"""vLLM's run-time LoRA endpoints, for the whole cluster: ``POST /v1/load_lora_adapter`` loads an
adapter (from a path the workers can read) on every worker of its base model and registers it for
the workers that join later; ``POST /v1/unload_lora_adapter`` removes it everywhere. Answers as
vLLM's: plain text on success, an OpenAI-shaped error otherwise (404 while
``lora.runtime_updates`` is off)."""

from __future__ import annotations

from aiohttp import web

from scheduler.app_keys import ADAPTERS, CLUSTER, CONFIG
from scheduler.config import SchedulerConfig
from scheduler.http.openai_schema import LoadLoraAdapterRequest, UnloadLoraAdapterRequest, bad
from scheduler.http.request_io import bearer_token, client_tenant, request_body
from scheduler.lora.operations import Outcome
from scheduler.lora.registry import Registration
from transport.errors import ErrorCode, PdorchError


def _authorize(request: web.Request, cfg: SchedulerConfig) -> None:
    if not cfg.lora.runtime_updates:
        raise PdorchError(ErrorCode.NOT_FOUND, "loading adapters at run time is off (lora.runtime_updates)")
    client_tenant(request, cfg)
    if cfg.lora.admin_keys and bearer_token(request) not in cfg.lora.admin_keys:
        raise PdorchError(ErrorCode.UNAUTHORIZED, "this key may not load or unload adapters")


async def load_lora_adapter(request: web.Request) -> web.Response:
    cfg, cluster = request.app[CONFIG], request.app[CLUSTER]
    _authorize(request, cfg)
    req = await request_body(request, LoadLoraAdapterRequest)
    name = req.lora_name
    models = cluster.models()
    if name in models:
        raise bad(f"{name!r} is the name of a base model")
    base = req.base_model
    if base is None:
        if len(models) != 1:
            raise bad(f"the cluster serves {len(models)} models; say which with 'base_model'")
        base = models[0]
    elif base not in models:
        raise PdorchError(ErrorCode.MODEL_NOT_FOUND, f"base model {base!r} is not served")
    outcome = await request.app[ADAPTERS].load(
        Registration(name, req.lora_path, base), replace=req.load_inplace
    )
    return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.{_partly(outcome)}")


async def unload_lora_adapter(request: web.Request) -> web.Response:
    _authorize(request, request.app[CONFIG])
    req = await request_body(request, UnloadLoraAdapterRequest)
    outcome = await request.app[ADAPTERS].unload(req.lora_name)
    return web.Response(
        text=f"Success: LoRA adapter '{req.lora_name}' removed successfully.{_partly(outcome)}"
    )


def _partly(outcome: Outcome) -> str:
    if not outcome.failed:
        return ""
    why = "; ".join(f"{wid}: {reason}" for wid, reason in sorted(outcome.failed.items()))
    return f" Not on {len(outcome.failed)} of {len(outcome.done) + len(outcome.failed)} workers ({why})."
