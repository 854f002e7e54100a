"""The manifests under test: where they are, rendering them, and finding objects in them."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.manifests.kustomize_render import render

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
TARGETS = [
    "base",
    "overlays/reference-cpu",
    "overlays/vllm-gpu",
    "overlays/lora-adapters",
    "overlays/vllm-gpu-lora",
]
# CRDs copied from the LWS project, kept beside the repository (never inside it).
SHARED_K8S = REPO / ".." / "shared" / "k8s"
LWS_CRD = SHARED_K8S / "leaderworkerset-crd.yaml"

Obj = dict[str, Any]


@functools.cache
def rendered(target: str) -> tuple[Obj, ...]:
    return tuple(render(MANIFESTS / target))


def by_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_templates(obj: Obj) -> Iterator[tuple[str, Obj]]:
    """(name, pod template) of a Deployment or a LeaderWorkerSet."""
    if obj["kind"] == "Deployment":
        yield "template", obj["spec"]["template"]
    elif obj["kind"] == "LeaderWorkerSet":
        lwt = obj["spec"]["leaderWorkerTemplate"]
        for name in ("leaderTemplate", "workerTemplate"):
            if name in lwt:
                yield name, lwt[name]


def leader_template(lws: Obj) -> Obj:
    """The template of a group's leader pod (the worker template when no leader template is set)."""
    lwt = lws["spec"]["leaderWorkerTemplate"]
    return lwt.get("leaderTemplate") or lwt["workerTemplate"]


def container(template: Obj, name: str) -> Obj:
    found = [c for c in template["spec"]["containers"] if c["name"] == name]
    assert len(found) == 1, f"expected one container {name}"
    return found[0]


def arg_value(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]
