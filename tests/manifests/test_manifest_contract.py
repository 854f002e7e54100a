"""What the manifests promise the scheduler and the cluster, beyond schema validity.

Least-privilege RBAC (exact verbs), the labels and names the scheduler's config relies on, the
Services agents dial, graceful termination, probes, resources, and the vLLM overlay's shape.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from scheduler.kubernetes.config import KubernetesConfig, load_kubernetes_config
from scheduler.kubernetes.pod_info import LWS_GROUP_INDEX_LABEL
from tests.manifests.targets import (
    TARGETS,
    Obj,
    arg_value,
    by_kind,
    container,
    leader_template,
    one,
    pod_templates,
    rendered,
)
from workers.engines.vllm.launch import SERVER_KEEPALIVE_S
from workers.engines.vllm.transfer_params import rank_endpoint

NAMESPACE = "pdorch"


def scheduler_config(objects: list[Obj]) -> dict[str, Any]:
    config_map = one(objects, "ConfigMap", "pdorch-scheduler-config")
    return msgspec.yaml.decode(config_map["data"]["scheduler.yaml"].encode())


def k8s_config(objects: list[Obj]) -> KubernetesConfig:
    return load_kubernetes_config(scheduler_config(objects)["kubernetes"])


def selector_matches(match_labels: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in match_labels.items())


# ------------------------------------------------------------------------------ RBAC


def test_rbac_is_least_privilege(objects: list[Obj]) -> None:
    assert by_kind(objects, "ClusterRole") == [] and by_kind(objects, "ClusterRoleBinding") == []
    (role,) = by_kind(objects, "Role")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): sorted(r["verbs"]) for r in role["rules"]}
    # Exactly the calls the scheduler makes: list_namespaced_pod (and its watch), the LWS scale
    # subresource's get and patch. Nothing else, nothing wider.
    assert rules == {
        (("",), ("pods",)): ["list", "watch"],
        (("leaderworkerset.x-k8s.io",), ("leaderworkersets/scale",)): ["get", "patch"],
    }
    assert all("resourceNames" not in r and "nonResourceURLs" not in r for r in role["rules"])
    assert _kubernetes_calls() == {
        "list_namespaced_pod",
        "get_namespaced_custom_object_scale",
        "patch_namespaced_custom_object_scale",
    }, "the scheduler calls another Kubernetes API: grant it in rbac.yaml (and nothing more)"

    (binding,) = by_kind(objects, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    deployment = one(objects, "Deployment", "pdorch-scheduler")
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]


def _kubernetes_calls() -> set[str]:
    """The Kubernetes client methods the scheduler's code calls (``<verb>_namespaced_...``)."""
    root = Path(__file__).resolve().parents[2] / "scheduler"
    pattern = re.compile(
        r"\.((?:list|get|watch|patch|replace|create|delete|read)_[a-z_]*namespaced[a-z_]*)\("
    )
    calls: set[str] = set()
    for path in root.rglob("*.py"):
        calls.update(pattern.findall(path.read_text()))
    return calls


def test_worker_pods_get_no_api_credentials(objects: list[Obj]) -> None:
    worker_account = one(objects, "ServiceAccount", "pdorch-worker")
    assert worker_account["automountServiceAccountToken"] is False
    for lws in by_kind(objects, "LeaderWorkerSet"):
        for name, template in pod_templates(lws):
            spec = template["spec"]
            assert spec["serviceAccountName"] == "pdorch-worker", name
            assert spec["automountServiceAccountToken"] is False, name


def test_everything_lives_in_one_namespace(objects: list[Obj]) -> None:
    assert [o["metadata"]["name"] for o in by_kind(objects, "Namespace")] == [NAMESPACE]
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]["name"]
    assert k8s_config(objects).namespace == NAMESPACE


def _ingress_allowed(
    policies: list[Obj], pod_labels: dict[str, str], source_labels: dict[str, str], port: dict[str, Any]
) -> bool:
    """Whether a pod of this namespace with ``source_labels`` may reach ``port`` (a container port)
    of a pod with ``pod_labels``: some rule of some policy selecting that pod allows both."""
    for policy in policies:
        if not selector_matches(policy["spec"]["podSelector"]["matchLabels"], pod_labels):
            continue
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            # Only same-namespace pod selectors are understood here; anything else counts as no match.
            source_ok = peers is None or any(
                set(peer) == {"podSelector"}
                and selector_matches(peer["podSelector"]["matchLabels"], source_labels)
                for peer in peers
            )
            ports = rule.get("ports")
            port_ok = ports is None or any(p["port"] in (port["name"], port["containerPort"]) for p in ports)
            if source_ok and port_ok:
                return True
    return False


def test_only_the_scheduler_http_port_is_reachable_from_outside(objects: list[Obj]) -> None:
    """Ray and the engines' servers have no authentication, and the ZeroMQ planes are better
    unreachable too: other pods may reach only the scheduler's HTTP port (API, metrics)."""
    policies = by_kind(objects, "NetworkPolicy")
    assert all(p["spec"]["policyTypes"] == ["Ingress"] for p in policies)
    outsider = {"app.kubernetes.io/name": "other"}
    checked = set()
    for obj in [*by_kind(objects, "Deployment"), *by_kind(objects, "LeaderWorkerSet")]:
        is_scheduler = obj["kind"] == "Deployment" and obj["metadata"]["name"] == "pdorch-scheduler"
        for _, template in pod_templates(obj):
            labels = template["metadata"]["labels"]
            assert any(selector_matches(p["spec"]["podSelector"]["matchLabels"], labels) for p in policies)
            for c in template["spec"]["containers"]:
                for port in c.get("ports", []):
                    where = (obj["metadata"]["name"], c["name"], port["name"])
                    assert _ingress_allowed(policies, labels, labels, port), where
                    public = is_scheduler and port["name"] == "http"
                    assert _ingress_allowed(policies, labels, outsider, port) == public, where
                    checked.add(port["name"])
    assert {"control", "kv-broker", "kv", "http"} <= checked


def container_env(objects: list[Obj], c: Obj) -> dict[str, str]:
    """The environment a container gets from its ``env`` values and its ``envFrom`` ConfigMaps."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    return env


def pdorch_processes(objects: list[Obj]) -> list[tuple[str, Obj, Obj, str]]:
    """(where, pod template, container, party) of every container running pdorch code that talks
    ZeroMQ: the scheduler, the KV broker, each pool's agents, and vLLM beside an agent (its KV
    connector is the agent's KV plane)."""
    found = []
    scheduler = one(objects, "Deployment", "pdorch-scheduler")["spec"]["template"]
    found.append(("scheduler", scheduler, container(scheduler, "scheduler"), "scheduler"))
    found.append(("kv-broker", scheduler, container(scheduler, "kv-broker"), "kv-broker"))
    for lws in by_kind(objects, "LeaderWorkerSet"):
        pool = lws["metadata"]["labels"]["pdorch.io/pool"]
        leader = leader_template(lws)
        for c in leader["spec"]["containers"]:
            if c["name"] in ("agent", "vllm"):
                found.append((f"{lws['metadata']['name']}/{c['name']}", leader, c, pool))
    return found


def _volume(template: Obj, c: Obj, mount_path: str) -> Obj:
    mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"] == mount_path]
    assert len(mounts) == 1, f"{c['name']} mounts nothing at {mount_path}"
    assert mounts[0].get("readOnly") is True, f"{c['name']}: {mount_path} must be read-only"
    (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == mounts[0]["name"]]
    return volume


def test_every_pdorch_process_authenticates_with_its_own_key(objects: list[Obj]) -> None:
    """Each process has the key Secret of the party it is (and no other), the trusted public keys,
    and the cluster's one explicit choice of KV payload; none runs without authentication."""
    (security,) = [m for m in by_kind(objects, "ConfigMap") if m["metadata"]["name"] == "pdorch-security"]
    assert security["data"]["PDORCH_KV_PAYLOAD"] in ("encrypted", "plaintext")
    assert "PDORCH_INSECURE" not in security["data"]
    processes = pdorch_processes(objects)
    assert {p[3] for p in processes} == {"scheduler", "kv-broker", "prefill", "decode"}
    for where, template, c, party in processes:
        env = container_env(objects, c)
        assert "PDORCH_INSECURE" not in env, where
        assert env["PDORCH_KV_PAYLOAD"] == security["data"]["PDORCH_KV_PAYLOAD"], where
        key_dir, key_file = env["PDORCH_KEY_FILE"].rsplit("/", 1)
        assert key_file == f"{party}.key", where
        key = _volume(template, c, key_dir)["secret"]
        assert key["secretName"] == f"pdorch-key-{party}", where
        trusted = _volume(template, c, env["PDORCH_TRUSTED_KEYS"])["secret"]
        assert trusted["secretName"] == "pdorch-trusted-keys", where
        for secret in (key, trusted):
            assert secret["defaultMode"] & 0o037 == 0, f"{where}: secrets readable by others"
    # Nothing mounts a key that is not its own.
    for where, template, c, party in processes:
        for mount in c.get("volumeMounts", []):
            (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == mount["name"]]
            name = volume.get("secret", {}).get("secretName", "")
            assert not name.startswith("pdorch-key-") or name == f"pdorch-key-{party}", where


def test_pods_run_with_least_privilege(objects: list[Obj]) -> None:
    """No pod gets the host's namespaces, service links or an automatic API token; pdorch's own
    containers have read-only root filesystems; only the scheduler container holds an API token,
    a projected one that expires."""
    for obj in objects:
        for name, template in pod_templates(obj):
            spec = template["spec"]
            where = f"{obj['metadata']['name']}/{name}"
            assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where
            assert spec.get("automountServiceAccountToken") is False, where
            assert spec.get("enableServiceLinks") is False, where
            for c in spec["containers"]:
                if c["image"].split("/")[-1].startswith("pdorch-vllm"):
                    continue  # vLLM writes caches into its image's filesystem
                assert c["securityContext"].get("readOnlyRootFilesystem") is True, f"{where}/{c['name']}"
                for mount in c.get("volumeMounts", []):
                    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
                    tokens = [
                        s
                        for s in volume.get("projected", {}).get("sources", [])
                        if "serviceAccountToken" in s
                    ]
                    if tokens:
                        assert (obj["metadata"]["name"], c["name"]) == ("pdorch-scheduler", "scheduler")
                        assert tokens[0]["serviceAccountToken"]["expirationSeconds"] <= 3607
    scheduler = container(one(objects, "Deployment", "pdorch-scheduler")["spec"]["template"], "scheduler")
    paths = {m["mountPath"] for m in scheduler["volumeMounts"]}
    assert "/var/run/secrets/kubernetes.io/serviceaccount" in paths  # where the API client looks


# ------------------------------------------------------------------------------ what discovery relies on


def test_pool_labels_match_the_scheduler_config(objects: list[Obj]) -> None:
    config = k8s_config(objects)
    assert config.discovery.enabled
    sets = {s["metadata"]["name"]: s for s in by_kind(objects, "LeaderWorkerSet")}
    for pool, pool_config in config.pools().items():
        lws = sets[pool_config.lws_name]
        for name, template in pod_templates(lws):
            labels = template["metadata"]["labels"]
            # Every pod of the pool, workers included (discovery tracks whole groups).
            assert selector_matches(pool_config.pod_labels, labels), (pool, name)
            assert labels["pdorch.io/role"] == pool
            other = config.decode if pool == "prefill" else config.prefill
            assert not selector_matches(other.pod_labels, labels), "a pod selected by both pools"


def test_the_agent_is_the_leader_and_named_after_its_pod(objects: list[Obj]) -> None:
    config = k8s_config(objects)
    for pool, pool_config in config.pools().items():
        lws = one(objects, "LeaderWorkerSet", pool_config.lws_name)
        leader = leader_template(lws)
        agent = container(leader, "agent")
        args = agent["args"]
        assert args[0] == "worker"
        assert arg_value(args, "--role") == pool
        # The worker id is the leader pod's name: what discovery drops and the autoscaler drains.
        assert arg_value(args, "--worker-id") == "$(POD_NAME)"
        env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in agent["env"]}
        assert env["POD_NAME"] == "metadata.name"
        assert env["POD_IP"] == "status.podIP"
        assert env["LWS_GROUP_INDEX"] == f"metadata.labels['{LWS_GROUP_INDEX_LABEL}']"
        assert arg_value(args, "--kv-advertise").startswith("tcp://$(POD_IP):")
        # Only leaders run an agent.
        worker = lws["spec"]["leaderWorkerTemplate"]
        if "leaderTemplate" in worker:
            assert all(c["name"] != "agent" for c in worker["workerTemplate"]["spec"]["containers"])


def test_agents_reach_the_scheduler_before_it_is_ready(objects: list[Obj]) -> None:
    config = scheduler_config(objects)
    deployment = one(objects, "Deployment", "pdorch-scheduler")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    ports = {
        p["name"]: p["containerPort"]
        for c in deployment["spec"]["template"]["spec"]["containers"]
        for p in c["ports"]
    }
    assert config["control_bind"] == f"tcp://0.0.0.0:{ports['control']}"
    assert config["port"] == ports["http"]
    for lws in by_kind(objects, "LeaderWorkerSet"):
        endpoint = arg_value(container(leader_template(lws), "agent")["args"], "--scheduler")
        host, port = re.fullmatch(r"tcp://([a-z0-9-]+):(\d+)", endpoint).groups()  # type: ignore[union-attr]
        service = one(objects, "Service", host)
        # The scheduler is ready only once workers registered: agents must reach it before.
        assert service["spec"]["publishNotReadyAddresses"] is True
        assert selector_matches(service["spec"]["selector"], pod_labels)
        service_ports = {p["port"]: p["targetPort"] for p in service["spec"]["ports"]}
        assert service_ports[int(port)] == "control"
    broker_host, broker_port = re.fullmatch(r"tcp://([a-z0-9-]+):(\d+)", config["kv_broker"]).groups()  # type: ignore[union-attr]
    broker_service = one(objects, "Service", broker_host)
    assert {p["port"]: p["targetPort"] for p in broker_service["spec"]["ports"]}[
        int(broker_port)
    ] == "kv-broker"


def test_client_service_is_gated_by_readiness(objects: list[Obj]) -> None:
    api = one(objects, "Service", "pdorch-api")
    assert not api["spec"].get("publishNotReadyAddresses", False)
    assert [p["port"] for p in api["spec"]["ports"]] == [8000]


def test_selectors_select_their_pods(objects: list[Obj]) -> None:
    deployment = one(objects, "Deployment", "pdorch-scheduler")
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector_matches(deployment["spec"]["selector"]["matchLabels"], template_labels)
    config = k8s_config(objects)
    for pool, pool_config in config.pools().items():
        pdb = one(objects, "PodDisruptionBudget", f"pdorch-{pool}")
        assert pdb["spec"]["maxUnavailable"] == 1
        lws = one(objects, "LeaderWorkerSet", pool_config.lws_name)
        for _, template in pod_templates(lws):
            assert selector_matches(pdb["spec"]["selector"]["matchLabels"], template["metadata"]["labels"])


# ------------------------------------------------------------------------------ lifecycle, probes, resources


def test_scheduler_probes(objects: list[Obj]) -> None:
    scheduler = container(one(objects, "Deployment", "pdorch-scheduler")["spec"]["template"], "scheduler")
    assert scheduler["args"] == ["scheduler", "--config", "/etc/pdorch/scheduler.yaml"]
    assert scheduler["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert scheduler["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert scheduler["startupProbe"]["httpGet"]["path"] == "/health"


def test_every_container_has_requests_and_limits(objects: list[Obj]) -> None:
    for obj in objects:
        for name, template in pod_templates(obj):
            spec = template["spec"]
            for c in spec["containers"] + spec.get("initContainers", []):
                resources = c["resources"]
                where = f"{obj['metadata']['name']}/{name}/{c['name']}"
                assert {"cpu", "memory"} <= set(resources["requests"]), where
                assert "memory" in resources["limits"], where


def test_workers_drain_before_their_pod_dies(objects: list[Obj]) -> None:
    for lws in by_kind(objects, "LeaderWorkerSet"):
        leader = leader_template(lws)
        grace = leader["spec"]["terminationGracePeriodSeconds"]
        assert grace >= 60
        agent = container(leader, "agent")
        assert agent["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
        for c in leader["spec"]["containers"]:
            if c["name"] == "agent":
                continue
            # An engine beside the agent keeps serving until the agent has drained and exited.
            assert leader["spec"]["shareProcessNamespace"] is True
            script = c["lifecycle"]["preStop"]["exec"]["command"][-1]
            bound = int(re.search(r"time\.monotonic\(\) \+ (\d+)", script).group(1))  # type: ignore[union-attr]
            assert bound < grace


def test_containers_run_unprivileged_where_they_can(objects: list[Obj]) -> None:
    for obj in objects:
        for name, template in pod_templates(obj):
            for c in template["spec"]["containers"]:
                if c["image"].split("/")[-1].startswith("pdorch-vllm"):
                    continue  # vLLM images run as root
                where = f"{obj['metadata']['name']}/{name}/{c['name']}"
                pod_context = template["spec"].get("securityContext", {})
                context = {**pod_context, **c.get("securityContext", {})}
                assert context.get("runAsNonRoot") is True, where
                assert context.get("allowPrivilegeEscalation") is False, where
                assert context["capabilities"]["drop"] == ["ALL"], where


# ------------------------------------------------------------------------------ overlays


@pytest.mark.parametrize("target", [t for t in TARGETS if t != "base"])
def test_overlays_enable_the_autoscaler(target: str) -> None:
    config = k8s_config(list(rendered(target)))
    assert config.autoscaler.enabled
    for pool in config.pools().values():
        assert pool.autoscaling.max_replicas > pool.autoscaling.min_replicas


def test_base_autoscaler_is_off() -> None:
    assert not k8s_config(list(rendered("base"))).autoscaler.enabled


@pytest.mark.parametrize("target", ["overlays/reference-cpu", "overlays/lora-adapters"])
def test_reference_overlay_has_no_gpus(target: str) -> None:
    text = json.dumps(rendered(target))
    assert "nvidia.com/gpu" not in text and "vllm" not in text.replace("pdorch-vllm", "")
    for lws in by_kind(list(rendered(target)), "LeaderWorkerSet"):
        assert arg_value(container(leader_template(lws), "agent")["args"], "--engine") == "reference"


VLLM_SHAPE = {
    "pdorch-prefill": ("compute-heavy", "kv_producer"),
    "pdorch-decode": ("memory-heavy", "kv_consumer"),
}


VLLM_TARGETS = ["overlays/vllm-gpu", "overlays/vllm-gpu-lora"]


@pytest.mark.parametrize("target", VLLM_TARGETS)
@pytest.mark.parametrize("name", sorted(VLLM_SHAPE))
def test_vllm_overlay_shape(name: str, target: str) -> None:
    accelerator_class, kv_role = VLLM_SHAPE[name]
    lws = one(list(rendered(target)), "LeaderWorkerSet", name)
    lwt = lws["spec"]["leaderWorkerTemplate"]
    assert lwt["size"] >= 2 and lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
    leader, worker = lwt["leaderTemplate"], lwt["workerTemplate"]
    for template in (leader, worker):
        assert template["spec"]["nodeSelector"] == {"pdorch.io/accelerator-class": accelerator_class}
        gpu_containers = [
            c for c in template["spec"]["containers"] if "nvidia.com/gpu" in c["resources"]["limits"]
        ]
        assert len(gpu_containers) == 1

    vllm = container(leader, "vllm")
    env = {e["name"]: e.get("value") for e in vllm["env"]}
    kv = json.loads(env["KV_TRANSFER_CONFIG"])
    assert kv["kv_connector"] == "PdorchConnector"
    assert kv["kv_connector_module_path"] == "workers.engines.vllm.connector"
    assert kv["kv_role"] == kv_role
    # vLLM keeps idle connections well past the agent's reuse limit (see the vLLM launcher).
    assert int(env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"]) == SERVER_KEEPALIVE_S
    script = vllm["args"][0]
    assert "ray start --head" in script and "LWS_GROUP_SIZE" in script
    assert "vllm.entrypoints.openai.api_server" in script and "--kv-transfer-config" in script
    # Only the leader serves HTTP; workers join the leader's Ray cluster.
    assert vllm["readinessProbe"]["httpGet"]["path"] == "/health"
    (ray_worker,) = worker["spec"]["containers"]
    assert "LWS_LEADER_ADDRESS" in ray_worker["args"][0] and "ray start --address" in ray_worker["args"][0]
    assert all(p["containerPort"] != 8000 for p in ray_worker.get("ports", []))

    agent_args = container(leader, "agent")["args"]
    assert arg_value(agent_args, "--engine") == "vllm"
    assert arg_value(agent_args, "--vllm-url") == "http://127.0.0.1:8000"
    if kv_role == "kv_consumer":
        # The decode connector receives KV itself: the agent advertises the connector's endpoint.
        port = kv["kv_connector_extra_config"]["pdorch_kv_bind"].rsplit(":", 1)[1]
        assert arg_value(agent_args, "--kv-advertise") == f"tcp://$(POD_IP):{port}"
        assert int(port) in {p["containerPort"] for p in vllm["ports"]}
        # The connector's notes that a load's KV is arriving reach the agent on the pod's loopback.
        notes = kv["kv_connector_extra_config"]["pdorch_kv_arrival_notes"]
        assert notes.startswith("tcp://127.0.0.1:")
        assert arg_value(agent_args, "--vllm-kv-arrival-notes") == notes
        # Tensor-parallel rank r receives at the KV port + r: the notes are on none of them.
        tp = (
            int(script.split("--tensor-parallel-size", 1)[1].split()[0])
            if "--tensor-parallel-size" in script
            else 1
        )
        bind = kv["kv_connector_extra_config"]["pdorch_kv_bind"]
        assert notes.rsplit(":", 1)[1] not in {rank_endpoint(bind, r).rsplit(":", 1)[1] for r in range(tp)}


@pytest.mark.parametrize("target", VLLM_TARGETS)
def test_vllm_overlay_images_point_at_a_registry(target: str) -> None:
    images = {
        c["image"]
        for lws in by_kind(list(rendered(target)), "LeaderWorkerSet")
        for _, template in pod_templates(lws)
        for c in template["spec"]["containers"] + template["spec"].get("initContainers", [])
    }
    assert images == {"registry.example.com/pdorch:0.1.0", "registry.example.com/pdorch-vllm:0.1.0"}


def test_the_scheduler_accepts_its_config_file(target: str, tmp_path: Path) -> None:
    """The ConfigMap's scheduler.yaml loads with the scheduler's own config loader."""
    from scheduler import config as scheduler_config_module

    objects = list(rendered(target))
    path = tmp_path / "scheduler.yaml"
    path.write_text(one(objects, "ConfigMap", "pdorch-scheduler-config")["data"]["scheduler.yaml"])
    # In the environment its container gets (its key, the trusted keys, the KV payload).
    scheduler = container(one(objects, "Deployment", "pdorch-scheduler")["spec"]["template"], "scheduler")
    loaded = scheduler_config_module.load_config(path, env=container_env(objects, scheduler))
    assert not loaded.security.insecure and loaded.security.key_file.endswith("scheduler.key")
    assert isinstance(loaded.kubernetes, KubernetesConfig)  # type: ignore[attr-defined]
    assert loaded.kubernetes == k8s_config(list(rendered(target)))  # type: ignore[attr-defined]
