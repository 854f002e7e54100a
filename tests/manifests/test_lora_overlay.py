"""The LoRA overlays (lora-adapters on reference-cpu, vllm-gpu-lora on vllm-gpu): where adapters
live and who may load them.

Every pod of both pools mounts the adapters volume read-only where its agent's ``--lora-root``
points; the scheduler's config turns run-time loading on, and its admin key comes from a Secret
the operator creates (through ``PDORCH_LORA``), never from the ConfigMap or the manifests. vLLM
serves LoRA with run-time updates.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from scheduler.config import SchedulerConfig, load_config
from tests.manifests.targets import (
    MANIFESTS,
    Obj,
    arg_value,
    by_kind,
    container,
    leader_template,
    one,
    pod_templates,
    rendered,
)
from tests.manifests.test_manifest_contract import container_env, scheduler_config
from transport.errors import PdorchError

# Each LoRA overlay and the overlay it builds on.
LORA_TARGETS = {
    "overlays/lora-adapters": "overlays/reference-cpu",
    "overlays/vllm-gpu-lora": "overlays/vllm-gpu",
}
CLAIM = "pdorch-adapters"
SECRET = "pdorch-lora-admin"
# The ranks vLLM accepts for --max-lora-rank.
VLLM_LORA_RANKS = {8, 16, 32, 64, 128, 256, 320, 512}


@pytest.fixture(params=sorted(LORA_TARGETS))
def lora_target(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _scheduler(objects: list[Obj]) -> Obj:
    return container(one(objects, "Deployment", "pdorch-scheduler")["spec"]["template"], "scheduler")


def _kubelet_env(objects: list[Obj], c: Obj, secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """The environment the kubelet gives a container: ConfigMaps from ``envFrom``, then each ``env``
    entry in order, a value's ``$(NAME)`` replaced by a variable defined before it (``secrets``
    stands for the Secrets the operator created: (name, key) -> value)."""
    env = container_env(objects, {"envFrom": c.get("envFrom", [])})
    for entry in c.get("env", []):
        if "value" in entry:
            env[entry["name"]] = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), entry["value"]
            )
        elif "secretKeyRef" in entry["valueFrom"]:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = secrets[(ref["name"], ref["key"])]
    return env


def _load(target: str, tmp_path: Path, secrets: dict[tuple[str, str], str]) -> SchedulerConfig:
    objects = list(rendered(target))
    path = tmp_path / "scheduler.yaml"
    path.write_text(one(objects, "ConfigMap", "pdorch-scheduler-config")["data"]["scheduler.yaml"])
    return load_config(path, env=_kubelet_env(objects, _scheduler(objects), secrets))


def test_every_pool_pod_mounts_the_adapters_read_only_at_its_lora_root(lora_target: str) -> None:
    objects = list(rendered(lora_target))
    claim = one(objects, "PersistentVolumeClaim", CLAIM)
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    pools = {lws["metadata"]["labels"]["pdorch.io/pool"]: lws for lws in by_kind(objects, "LeaderWorkerSet")}
    assert set(pools) == {"prefill", "decode"}
    for pool, lws in pools.items():
        root = arg_value(container(leader_template(lws), "agent")["args"], "--lora-root")
        for name, template in pod_templates(lws):
            spec = template["spec"]
            (volume,) = [
                v for v in spec["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == CLAIM
            ]
            assert volume["persistentVolumeClaim"].get("readOnly") is True, (pool, name)
            # Each container of the pod (the agent; vLLM's server and its Ray workers where they
            # run) reads an adapter at the path the scheduler was given.
            for c in spec["containers"]:
                where = (pool, name, c["name"])
                mounts = [m for m in c.get("volumeMounts", []) if m["name"] == volume["name"]]
                assert [m["mountPath"] for m in mounts] == [root], where
                assert mounts[0].get("readOnly") is True, where
                if c["name"] == "agent":
                    # Mounting it leaves the agent as locked down as before.
                    context = {**spec.get("securityContext", {}), **c["securityContext"]}
                    assert context["runAsNonRoot"] and context["readOnlyRootFilesystem"], where


def test_the_overlay_turns_runtime_updates_on(lora_target: str, tmp_path: Path) -> None:
    assert scheduler_config(list(rendered(lora_target)))["lora"]["runtime_updates"] is True
    assert _load(lora_target, tmp_path, {(SECRET, "admin-key"): "k"}).lora.runtime_updates


def test_the_config_is_the_underlying_overlays_with_lora(lora_target: str) -> None:
    """The overlay replaces its base overlay's scheduler.yaml; nothing but ``lora:`` may differ."""
    overlay = scheduler_config(list(rendered(lora_target)))
    overlay.pop("lora")
    assert overlay == scheduler_config(list(rendered(LORA_TARGETS[lora_target])))


@pytest.mark.parametrize("key", ["3f6c0e9a7d1b44c2a8e5f0b1c2d3e4f5", "0123456789", "yes"])
def test_admin_keys_come_from_a_secret(lora_target: str, tmp_path: Path, key: str) -> None:
    objects = list(rendered(lora_target))
    assert "admin_keys" not in scheduler_config(objects)["lora"], "an admin key in the ConfigMap"
    # No Secret ships with the manifests (no default key to forget to change): the operator
    # creates it, and the scheduler does not start without it.
    assert by_kind(objects, "Secret") == []
    refs = [
        e["valueFrom"]["secretKeyRef"]
        for e in _scheduler(objects)["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    ]
    assert {(r["name"], r["key"]) for r in refs} == {(SECRET, "admin-key")}
    assert not any(r.get("optional") for r in refs)
    # The key reaches the scheduler's config as a string, whatever it looks like.
    assert _load(lora_target, tmp_path, {(SECRET, "admin-key"): key}).lora.admin_keys == [key]


def test_an_empty_admin_key_stops_the_scheduler(lora_target: str, tmp_path: Path) -> None:
    """A Secret created with an empty value would let any request load adapters: refused."""
    with pytest.raises(PdorchError, match="empty key"):
        _load(lora_target, tmp_path, {(SECRET, "admin-key"): ""})


def test_both_overlays_share_the_volume_and_the_admin_key() -> None:
    """The vLLM overlay keeps copies of the reference one's claim and admin-key patch (kustomize
    reads files only under an overlay's directory): they must stay the same."""
    for name in ("adapters-pvc.yaml", "lora-admin-key.yaml"):
        copies = {(MANIFESTS / target / name).read_text() for target in LORA_TARGETS}
        assert len(copies) == 1, name


@pytest.mark.parametrize("name", ["pdorch-prefill", "pdorch-decode"])
def test_vllm_serves_lora_with_runtime_updates(name: str) -> None:
    vllm = container(
        leader_template(one(list(rendered("overlays/vllm-gpu-lora")), "LeaderWorkerSet", name)), "vllm"
    )
    env = {e["name"]: e.get("value") for e in vllm["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    # The server's command line ends with these flags.
    assert vllm["args"][0].rstrip().endswith("$EXTRA_VLLM_ARGS")
    flags = shlex.split(env["EXTRA_VLLM_ARGS"])
    assert "--enable-lora" in flags
    assert int(arg_value(flags, "--max-loras")) >= 1
    assert int(arg_value(flags, "--max-lora-rank")) in VLLM_LORA_RANKS
