"""The small kustomize renderer: the features it claims, the ones it refuses, and agreement with
the real kustomize (``kubectl kustomize``) wherever kubectl is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.manifests.kustomize_render import KustomizeError, render
from tests.manifests.targets import MANIFESTS, TARGETS

KUBECTL = shutil.which("kubectl")


def _key(obj: dict[str, Any]) -> tuple[str, str, str, str]:
    meta = obj["metadata"]
    return obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"]


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its built-in kustomize) is not installed")
@pytest.mark.parametrize("target", TARGETS)
def test_same_objects_as_real_kustomize(target: str) -> None:
    run = subprocess.run(
        [str(KUBECTL), "kustomize", str(MANIFESTS / target)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    real = {_key(o): o for o in yaml.safe_load_all(run.stdout) if o}
    ours = {_key(o): o for o in render(MANIFESTS / target)}
    assert sorted(ours) == sorted(real)
    for key, obj in ours.items():
        assert obj == real[key], key


def write(directory: Path, files: dict[str, Any]) -> Path:
    for name, content in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else yaml.safe_dump_all(content))
    return directory


DEPLOYMENT = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "app", "namespace": "ns"},
    "spec": {
        "template": {
            "spec": {
                "initContainers": [{"name": "init", "image": "registry:5000/tool:1"}],
                "containers": [{"name": "main", "image": "pdorch:0.1.0"}, {"name": "side", "image": "other"}],
            }
        }
    },
}
CUSTOM = {
    "apiVersion": "example.io/v1",
    "kind": "Thing",
    "metadata": {"name": "thing-a", "namespace": "ns"},
    "spec": {
        "nested": {"deeper": {"containers": [{"name": "c", "image": "pdorch@sha256:abc"}]}},
        "list": [1, 2],
    },
}


def kustomization(**fields: Any) -> str:
    return yaml.safe_dump(
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", **fields}
    )


def test_resources_patches_images_and_generators(tmp_path: Path) -> None:
    base = write(
        tmp_path / "base",
        {
            "objects.yaml": [DEPLOYMENT, CUSTOM],
            "app.conf": "a: 1\n",
            "kustomization.yaml": kustomization(
                resources=["objects.yaml"],
                configMapGenerator=[
                    {"name": "cfg", "namespace": "ns", "files": ["app.conf"], "literals": ["k=v"]}
                ],
                generatorOptions={"disableNameSuffixHash": True, "labels": {"app": "x"}},
            ),
        },
    )
    overlay = write(
        tmp_path / "overlay",
        {
            "app.conf": "a: 2\n",
            "patch.yaml": [
                [
                    {"op": "test", "path": "/spec/list/0", "value": 1},
                    {"op": "add", "path": "/spec/list/-", "value": 3},
                    {"op": "add", "path": "/spec/list/0", "value": 0},
                    {"op": "replace", "path": "/spec/nested/new~1key", "value": "slash"},
                    {"op": "remove", "path": "/spec/nested/deeper"},
                ]
            ],
            "kustomization.yaml": kustomization(
                resources=["../base"],
                configMapGenerator=[
                    {"name": "cfg", "namespace": "ns", "behavior": "merge", "files": ["app.conf"]}
                ],
                patches=[
                    {
                        "path": "patch.yaml",
                        "target": {"group": "example.io", "kind": "Thing", "name": "thing-.*"},
                    }
                ],
                images=[
                    {"name": "pdorch", "newName": "reg.io/pdorch", "newTag": "7"},
                    {"name": "registry:5000/tool", "digest": "sha256:def"},
                ],
            ),
        },
    )
    # "replace" of a key that does not exist yet must fail; fix the patch to "add" and re-render.
    with pytest.raises(KustomizeError, match="replace of missing"):
        render(overlay)
    text = (overlay / "patch.yaml").read_text().replace("op: replace", "op: add")
    (overlay / "patch.yaml").write_text(text)

    out = {o["kind"]: o for o in render(overlay)}
    assert out["Thing"]["spec"] == {"nested": {"new/key": "slash"}, "list": [0, 1, 2, 3]}
    containers = out["Deployment"]["spec"]["template"]["spec"]
    assert [c["image"] for c in containers["containers"]] == ["reg.io/pdorch:7", "other"]
    assert containers["initContainers"][0]["image"] == "registry:5000/tool@sha256:def"
    assert out["ConfigMap"] == {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "cfg", "namespace": "ns", "labels": {"app": "x"}},
        "data": {"app.conf": "a: 2\n", "k": "v"},
    }
    if KUBECTL is not None:  # the real kustomize agrees on this synthetic case too
        run = subprocess.run(
            [KUBECTL, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stderr
        assert sorted(yaml.safe_load_all(run.stdout), key=_key) == sorted(render(overlay), key=_key)
    # The base alone is untouched by the overlay.
    base_out = {o["kind"]: o for o in render(base)}
    assert base_out["Thing"]["spec"]["nested"]["deeper"]["containers"][0]["image"] == "pdorch@sha256:abc"


@pytest.mark.parametrize(
    ("fields", "files", "message"),
    [
        ({"namePrefix": "x-"}, {}, "unsupported field"),
        ({"resources": ["missing.yaml"]}, {}, "not found"),
        ({"resources": ["a.yaml", "a.yaml"]}, {"a.yaml": [DEPLOYMENT]}, "duplicate resource"),
        ({"configMapGenerator": [{"name": "c", "literals": ["k=v"]}]}, {}, "disableNameSuffixHash"),
        (
            {
                "resources": ["a.yaml"],
                "patches": [{"patch": "metadata: {name: app}", "target": {"kind": "Deployment"}}],
            },
            {"a.yaml": [DEPLOYMENT]},
            "only JSON 6902",
        ),
        (
            {
                "resources": ["a.yaml"],
                "patches": [{"patch": "[{op: add, path: /x, value: 1}]", "target": {"kind": "Nope"}}],
            },
            {"a.yaml": [DEPLOYMENT]},
            "matches no resource",
        ),
        (
            {
                "resources": ["a.yaml"],
                "patches": [
                    {"patch": "[{op: test, path: /kind, value: Pod}]", "target": {"kind": "Deployment"}}
                ],
            },
            {"a.yaml": [DEPLOYMENT]},
            "test failed",
        ),
        (
            {
                "resources": ["a.yaml"],
                "patches": [{"patch": "[{op: move, from: /a, path: /b}]", "target": {"kind": "Deployment"}}],
            },
            {"a.yaml": [DEPLOYMENT]},
            "unsupported operation",
        ),
    ],
)
def test_unsupported_or_wrong_input_is_refused(
    tmp_path: Path, fields: dict[str, Any], files: dict[str, Any], message: str
) -> None:
    write(tmp_path, {**files, "kustomization.yaml": kustomization(**fields)})
    with pytest.raises(KustomizeError, match=message):
        render(tmp_path)
