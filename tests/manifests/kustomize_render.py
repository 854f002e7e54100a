"""A small renderer for the kustomize features pdorch's manifests use, so tests run anywhere.

Deployments use the real kustomize (``kubectl apply -k``). This renderer exists because CI may
have no kustomize binary; where ``kubectl`` is installed, the tests check that both render the
same objects. It supports exactly these ``kustomization.yaml`` fields, and rejects any other:

- ``resources``: YAML files (several documents each) and directories holding a kustomization;
- ``configMapGenerator``: ``name``, ``namespace``, ``behavior`` (create / replace / merge),
  ``files`` (``path`` or ``key=path``) and ``literals`` (``key=value``);
- ``generatorOptions``: ``disableNameSuffixHash`` (must be true: this renderer does not compute
  kustomize's content hash nor rewrite references to hashed names) and ``labels``;
- ``patches``: JSON 6902 operations (``add``, ``remove``, ``replace``, ``test``) from ``path`` or
  inline ``patch``, selected by ``target`` (``group``, ``version``, ``kind``, ``name`` as an
  anchored regular expression, ``namespace``); strategic-merge patches are rejected;
- ``images``: ``name`` -> ``newName`` / ``newTag`` / ``digest``, applied to every ``containers``
  and ``initContainers`` list at any depth (as kustomize does, so LeaderWorkerSets are covered).

Order, as in kustomize: resources, then generators, then patches, then images.

Usage: ``python -m tests.manifests.kustomize_render manifests/overlays/reference-cpu``.
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "configMapGenerator",
    "generatorOptions",
    "patches",
    "images",
}
GENERATOR_FIELDS = {"name", "namespace", "behavior", "files", "literals"}
PATCH_FIELDS = {"path", "patch", "target"}
TARGET_FIELDS = {"group", "version", "kind", "name", "namespace"}
IMAGE_FIELDS = {"name", "newName", "newTag", "digest"}

Resource = dict[str, Any]


class KustomizeError(Exception):
    pass


def render(directory: Path | str) -> list[Resource]:
    """The objects ``kustomize build <directory>`` would produce (order aside)."""
    return _build(Path(directory).resolve(), stack=())


def render_yaml(directory: Path | str) -> str:
    return yaml.safe_dump_all(render(directory), sort_keys=True)


# ------------------------------------------------------------------------------------- build


def _build(directory: Path, stack: tuple[Path, ...]) -> list[Resource]:
    if directory in stack:
        raise KustomizeError(f"cycle in resources: {' -> '.join(map(str, (*stack, directory)))}")
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"no kustomization.yaml in {directory}")
    k = yaml.safe_load(path.read_text()) or {}
    _only(k, KUSTOMIZATION_FIELDS, str(path))
    if k.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{path}: kind must be Kustomization")

    resources: list[Resource] = []
    for entry in k.get("resources") or []:
        target = (directory / entry).resolve()
        if target.is_dir():
            resources.extend(_build(target, (*stack, directory)))
        elif target.is_file():
            resources.extend(doc for doc in yaml.safe_load_all(target.read_text()) if doc)
        else:
            raise KustomizeError(f"{path}: resource {entry!r} not found")
    _check_unique(resources, str(path))

    options = k.get("generatorOptions") or {}
    _only(options, {"disableNameSuffixHash", "labels"}, f"{path}: generatorOptions")
    for generator in k.get("configMapGenerator") or []:
        _generate_config_map(directory, generator, options, resources, str(path))

    for patch in k.get("patches") or []:
        _apply_patch(directory, patch, resources, str(path))

    for image in k.get("images") or []:
        _only(image, IMAGE_FIELDS, f"{path}: images")
        for resource in resources:
            _set_images(resource, image)
    return resources


def _only(mapping: Any, allowed: set[str], where: str) -> None:
    if not isinstance(mapping, dict):
        raise KustomizeError(f"{where}: expected a mapping")
    unknown = set(mapping) - allowed
    if unknown:
        raise KustomizeError(
            f"{where}: unsupported field(s) {sorted(unknown)} (this renderer knows {sorted(allowed)})"
        )


def _key(resource: Resource) -> tuple[str, str, str, str]:
    meta = resource.get("metadata") or {}
    return (
        resource.get("apiVersion", ""),
        resource.get("kind", ""),
        meta.get("namespace", ""),
        meta.get("name", ""),
    )


def _check_unique(resources: list[Resource], where: str) -> None:
    seen: set[tuple[str, str, str, str]] = set()
    for resource in resources:
        key = _key(resource)
        if key in seen:
            raise KustomizeError(f"{where}: duplicate resource {key}")
        seen.add(key)


# ------------------------------------------------------------------------------------- generators


def _generate_config_map(
    directory: Path, generator: dict[str, Any], options: dict[str, Any], resources: list[Resource], where: str
) -> None:
    _only(generator, GENERATOR_FIELDS, f"{where}: configMapGenerator")
    name = generator["name"]
    behavior = generator.get("behavior", "create")
    data: dict[str, str] = {}
    for entry in generator.get("files") or []:
        key, _, file = entry.rpartition("=") if "=" in entry else ("", "", entry)
        data[key or Path(file).name] = (directory / file).read_text()
    for literal in generator.get("literals") or []:
        key, sep, value = literal.partition("=")
        if not sep:
            raise KustomizeError(f"{where}: literal {literal!r} must be key=value")
        data[key] = value
    metadata: dict[str, Any] = {"name": name}
    if generator.get("namespace"):
        metadata["namespace"] = generator["namespace"]

    existing = [r for r in resources if r.get("kind") == "ConfigMap" and r["metadata"]["name"] == name]
    existing = [r for r in existing if r["metadata"].get("namespace", "") == metadata.get("namespace", "")]
    if behavior == "create":
        if existing:
            raise KustomizeError(f"{where}: ConfigMap {name} already exists (use behavior replace or merge)")
        if not options.get("disableNameSuffixHash"):
            raise KustomizeError(
                f"{where}: set generatorOptions.disableNameSuffixHash: true (hashes not supported)"
            )
        if options.get("labels"):
            metadata["labels"] = dict(options["labels"])
        resources.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    elif behavior in ("replace", "merge"):
        if len(existing) != 1:
            raise KustomizeError(
                f"{where}: behavior {behavior} needs exactly one ConfigMap {name} from resources"
            )
        target = existing[0]
        # The generated object's own labels/annotations merge in; the base keeps its name and options.
        target["data"] = data if behavior == "replace" else {**(target.get("data") or {}), **data}
    else:
        raise KustomizeError(f"{where}: unknown behavior {behavior!r}")


# ------------------------------------------------------------------------------------- patches


def _apply_patch(directory: Path, spec: dict[str, Any], resources: list[Resource], where: str) -> None:
    _only(spec, PATCH_FIELDS, f"{where}: patches")
    if ("path" in spec) == ("patch" in spec):
        raise KustomizeError(f"{where}: a patch needs exactly one of path or patch")
    text = (directory / spec["path"]).read_text() if "path" in spec else spec["patch"]
    ops = yaml.safe_load(text)
    if not isinstance(ops, list) or not all(isinstance(op, dict) and "op" in op for op in ops):
        raise KustomizeError(f"{where}: only JSON 6902 patches (a list of operations) are supported")
    target = spec.get("target")
    if not target:
        raise KustomizeError(f"{where}: a JSON 6902 patch needs a target")
    _only(target, TARGET_FIELDS, f"{where}: patches.target")
    matched = [r for r in resources if _matches(r, target)]
    if not matched:
        raise KustomizeError(f"{where}: patch target {target} matches no resource")
    for resource in matched:
        for op in ops:
            _apply_op(resource, op, f"{where}: {resource.get('kind')}/{resource['metadata'].get('name')}")


def _matches(resource: Resource, target: dict[str, str]) -> bool:
    group, _, version = resource.get("apiVersion", "").rpartition("/")
    meta = resource.get("metadata") or {}
    checks = {
        "group": group,
        "version": version,
        "kind": resource.get("kind", ""),
        "namespace": meta.get("namespace", ""),
    }
    for field, actual in checks.items():
        if field in target and target[field] != actual:
            return False
    return "name" not in target or re.fullmatch(target["name"], meta.get("name", "")) is not None


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with /")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _parent(document: Any, parts: list[str], where: str) -> Any:
    node = document
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[_index(node, part, where, existing=True)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KustomizeError(f"{where}: path segment {part!r} does not exist")
    return node


def _index(node: list[Any], part: str, where: str, *, existing: bool) -> int:
    if part == "-" and not existing:
        return len(node)
    if not part.isdigit():
        raise KustomizeError(f"{where}: {part!r} is not an array index")
    i = int(part)
    if i > len(node) or (existing and i == len(node)):
        raise KustomizeError(f"{where}: index {i} out of range")
    return i


def _apply_op(document: Any, op: dict[str, Any], where: str) -> None:
    kind = op["op"]
    parts = _pointer(op["path"])
    parent = _parent(document, parts, where)
    last = parts[-1]
    value = copy.deepcopy(op.get("value"))
    if kind == "add":
        if isinstance(parent, list):
            parent.insert(_index(parent, last, where, existing=False), value)
        else:
            parent[last] = value
    elif kind in ("replace", "remove", "test"):
        if isinstance(parent, list):
            i = _index(parent, last, where, existing=True)
        elif last in parent:
            i = last  # type: ignore[assignment]
        else:
            raise KustomizeError(f"{where}: {kind} of missing {op['path']}")
        if kind == "replace":
            parent[i] = value
        elif kind == "remove":
            del parent[i]
        elif parent[i] != value:
            raise KustomizeError(f"{where}: test failed at {op['path']}: {parent[i]!r} != {value!r}")
    else:
        raise KustomizeError(f"{where}: unsupported operation {kind!r}")


# ------------------------------------------------------------------------------------- images


def _split_image(image: str) -> tuple[str, str, str]:
    """name, tag, digest; a registry port (host:5000/x) is part of the name."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :], digest
    return name, "", digest


def _set_images(node: Any, image: dict[str, str]) -> None:
    if isinstance(node, list):
        for item in node:
            _set_images(item, image)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("containers", "initContainers") and isinstance(value, list):
            for container in value:
                if isinstance(container, dict) and isinstance(container.get("image"), str):
                    container["image"] = _new_image(container["image"], image)
        _set_images(value, image)


def _new_image(current: str, image: dict[str, str]) -> str:
    name, tag, digest = _split_image(current)
    if name != image["name"]:
        return current
    name = image.get("newName", name)
    if image.get("digest"):
        return f"{name}@{image['digest']}"
    tag = image.get("newTag", tag)
    if tag:
        return f"{name}:{tag}"
    return f"{name}@{digest}" if digest else name


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.manifests.kustomize_render <directory>", file=sys.stderr)
        return 2
    sys.stdout.write(render_yaml(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
