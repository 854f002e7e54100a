"""Every manifest of the base and of each rendered overlay validates strictly.

LeaderWorkerSets against the LWS CRD's OpenAPI schema with unknown fields rejected; built-in kinds
with ``kubernetes-validate --strict``. Broken copies (a misspelt field, a wrong type) must fail.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.manifests.strict_crd import CrdSchema
from tests.manifests.targets import TARGETS, Obj, by_kind, leader_template, one, rendered

# The oldest Kubernetes release the manifests claim to support, and the newest schemas available.
KUBERNETES_VERSIONS = ["1.29", kubernetes_validate.latest_version()]
BUILTIN_KINDS = {
    "Namespace",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ConfigMap",
    "Service",
    "Deployment",
    "PodDisruptionBudget",
    "NetworkPolicy",
}
# Kinds only some overlays have (the LoRA overlays' volume of adapters).
OPTIONAL_KINDS = {"PersistentVolumeClaim"}


def test_only_known_kinds(objects: list[Obj]) -> None:
    kinds = {o["kind"] for o in objects}
    assert kinds - {"LeaderWorkerSet"} <= BUILTIN_KINDS | OPTIONAL_KINDS, "a kind no test validates"
    assert kinds - OPTIONAL_KINDS == BUILTIN_KINDS | {"LeaderWorkerSet"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_kinds_validate_strictly(objects: list[Obj], version: str) -> None:
    for obj in objects:
        if obj["kind"] == "LeaderWorkerSet":
            continue
        kubernetes_validate.validate(obj, version, strict=True)  # raises on any problem


def test_leaderworkersets_validate_against_the_crd(objects: list[Obj], lws_schema: CrdSchema) -> None:
    sets = by_kind(objects, "LeaderWorkerSet")
    assert {s["metadata"]["name"] for s in sets} == {"pdorch-prefill", "pdorch-decode"}
    for lws in sets:
        assert lws_schema.errors(lws) == [], lws["metadata"]["name"]


def test_the_cli_accepts_the_rendered_overlays(tmp_path: Path) -> None:
    # The same check as a user would run it: kubernetes-validate --strict on the rendered YAML.
    for target in TARGETS:
        builtins = [o for o in rendered(target) if o["kind"] != "LeaderWorkerSet"]
        path = tmp_path / f"{target.replace('/', '-')}.yaml"
        path.write_text(yaml.safe_dump_all(builtins))
        run = subprocess.run(
            [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stdout + run.stderr


# ------------------------------------------------------------------------------ broken copies


def _lws(target: str = "overlays/vllm-gpu", name: str = "pdorch-prefill") -> Obj:
    return copy.deepcopy(one(list(rendered(target)), "LeaderWorkerSet", name))


def _deployment() -> Obj:
    return copy.deepcopy(one(list(rendered("base")), "Deployment", "pdorch-scheduler"))


def _misspell_restart_policy(lws: Obj) -> None:
    lwt = lws["spec"]["leaderWorkerTemplate"]
    lwt["restartPolicie"] = lwt.pop("restartPolicy")


def _misspell_container_field(lws: Obj) -> None:
    agent = leader_template(lws)["spec"]["containers"][-1]
    agent["imagePullPolicey"] = "Always"


def _misspell_template_label_field(lws: Obj) -> None:
    leader_template(lws)["metadata"]["lables"] = {"a": "b"}


def _misspell_metadata(lws: Obj) -> None:
    lws["metadata"]["namespce"] = "pdorch"


def _size_as_text(lws: Obj) -> None:
    lws["spec"]["leaderWorkerTemplate"]["size"] = "two"


def _replicas_negative(lws: Obj) -> None:
    lws["spec"]["replicas"] = -1


def _bad_restart_policy(lws: Obj) -> None:
    lws["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Sometimes"


def _port_as_list(lws: Obj) -> None:
    leader_template(lws)["spec"]["containers"][0]["ports"][0]["containerPort"] = [8000]


def _duplicate_container_name(lws: Obj) -> None:
    containers = leader_template(lws)["spec"]["containers"]
    containers.append(copy.deepcopy(containers[0]))


def _wrong_kind(lws: Obj) -> None:
    lws["kind"] = "LeaderWorkerSets"


LWS_BREAKS = [
    _misspell_restart_policy,
    _misspell_container_field,
    _misspell_template_label_field,
    _misspell_metadata,
    _size_as_text,
    _replicas_negative,
    _bad_restart_policy,
    _port_as_list,
    _duplicate_container_name,
    _wrong_kind,
]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("breaker", LWS_BREAKS, ids=[f.__name__.strip("_") for f in LWS_BREAKS])
def test_broken_leaderworkerset_fails(lws_schema: CrdSchema, breaker: object, target: str) -> None:
    lws = _lws(target)
    assert lws_schema.errors(lws) == []
    breaker(lws)  # type: ignore[operator]
    assert lws_schema.errors(lws) != []


def _deployment_typo(d: Obj) -> None:
    d["spec"]["template"]["spec"]["containers"][0]["imagePullPolicey"] = "Always"


def _deployment_wrong_type(d: Obj) -> None:
    d["spec"]["replicas"] = "one"


def _deployment_bad_probe(d: Obj) -> None:
    d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = {"name": "http"}


def _deployment_metadata_typo(d: Obj) -> None:
    d["metadata"]["lables"] = {"a": "b"}


DEPLOYMENT_BREAKS = [
    _deployment_typo,
    _deployment_wrong_type,
    _deployment_bad_probe,
    _deployment_metadata_typo,
]


@pytest.mark.parametrize("breaker", DEPLOYMENT_BREAKS, ids=[f.__name__.strip("_") for f in DEPLOYMENT_BREAKS])
def test_broken_builtin_kind_fails(breaker: object) -> None:
    deployment = _deployment()
    kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    breaker(deployment)  # type: ignore[operator]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_the_cli_rejects_a_broken_file(tmp_path: Path) -> None:
    deployment = _deployment()
    _deployment_typo(deployment)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(deployment))
    run = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0 and "imagePullPolicey" in run.stdout


def test_lax_schema_would_have_missed_the_typo(lws_schema: CrdSchema) -> None:
    """Why the strict check exists: the CRD schema as published accepts unknown fields."""
    import jsonschema

    lws = _lws()
    _misspell_container_field(lws)
    assert list(jsonschema.Draft7Validator(lws_schema.schema).iter_errors(lws)) == []
    assert any("imagePullPolicey" in e for e in lws_schema.errors(lws))
