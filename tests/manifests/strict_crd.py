"""Strict validation of custom resources against a CRD's OpenAPI v3 schema (tests only).

An API server *prunes* unknown fields of a custom resource (with a warning) instead of rejecting
them, so a typo in a LeaderWorkerSet silently disappears. This validator rejects them: wherever the
schema lists ``properties`` (and does not say ``x-kubernetes-preserve-unknown-fields``), no other
property is allowed. It also checks what the API server checks beyond plain JSON Schema:

- ``x-kubernetes-int-or-string`` fields take an integer or a string;
- ``nullable`` fields take null;
- ``x-kubernetes-list-type: map`` lists have unique ``x-kubernetes-list-map-keys``, ``set`` lists
  unique items;
- the object's ``metadata`` is a valid ObjectMeta (checked by ``kubernetes-validate``, strict),
  since the CRD schema only says ``type: object`` there;
- ``apiVersion`` and ``kind`` are the CRD's.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

Schema = dict[str, Any]


class CrdSchema:
    def __init__(self, crd: dict[str, Any], version: str | None = None) -> None:
        spec = crd["spec"]
        versions = spec["versions"]
        chosen = next((v for v in versions if v["name"] == version), None) if version else None
        chosen = chosen or next(v for v in versions if v.get("storage", True))
        self.group: str = spec["group"]
        self.version: str = chosen["name"]
        self.kind: str = spec["names"]["kind"]
        self.schema: Schema = chosen["schema"]["openAPIV3Schema"]
        self._strict = strict_schema(self.schema)
        self._validator = jsonschema.Draft7Validator(self._strict)

    @classmethod
    def load(cls, path: Path, version: str | None = None) -> CrdSchema:
        return cls(yaml.safe_load(path.read_text()), version)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    def errors(self, obj: dict[str, Any], kubernetes_version: str = "1.30") -> list[str]:
        """Every problem found, as ``path: message``; empty when the object is valid."""
        out: list[str] = []
        if obj.get("apiVersion") != self.api_version or obj.get("kind") != self.kind:
            out.append(f"apiVersion/kind: expected {self.api_version} {self.kind}")
        for error in sorted(self._validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
            out.append(f"{_path(error.absolute_path)}: {error.message}")
        out.extend(_list_type_errors(self.schema, obj, ""))
        out.extend(_metadata_errors(obj.get("metadata"), kubernetes_version))
        return out


def _path(parts: Any) -> str:
    return ".".join(str(p) for p in parts) or "<root>"


def strict_schema(schema: Schema) -> Schema:
    """A copy of ``schema`` with unknown properties forbidden and OpenAPI extensions made explicit."""
    out = copy.deepcopy(schema)
    _tighten(out)
    return out


def _tighten(node: Any) -> None:
    if isinstance(node, list):
        for item in node:
            _tighten(item)
        return
    if not isinstance(node, dict):
        return
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
        node.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in node:
        node["type"] = [node["type"], "null"]
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        node["additionalProperties"] = False
    for key in ("properties", "patternProperties", "definitions"):
        for child in (node.get(key) or {}).values():
            _tighten(child)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict | list):
            _tighten(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        _tighten(node.get(key) or [])


def _list_type_errors(schema: Schema, value: Any, where: str) -> Iterator[str]:
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, child in value.items():
            sub = properties.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                yield from _list_type_errors(sub, child, f"{where}.{key}" if where else key)
    elif isinstance(value, list):
        kind = schema.get("x-kubernetes-list-type")
        if kind == "map":
            keys = schema.get("x-kubernetes-list-map-keys") or []
            seen = [tuple(item.get(k) for k in keys) for item in value if isinstance(item, dict)]
            for dup in {k for k in seen if seen.count(k) > 1}:
                yield f"{where}: duplicate entry {dict(zip(keys, dup, strict=True))} (list-map keys {keys})"
        elif kind == "set":
            for i, item in enumerate(value):
                if item in value[:i]:
                    yield f"{where}: duplicate item {item!r} in a set"
        items = schema.get("items")
        if isinstance(items, dict):
            for i, child in enumerate(value):
                yield from _list_type_errors(items, child, f"{where}[{i}]")


def _metadata_errors(metadata: Any, kubernetes_version: str) -> list[str]:
    # Borrow a built-in kind whose metadata is a plain ObjectMeta, and let kubernetes-validate
    # check that part strictly.
    probe = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata}
    try:
        kubernetes_validate.validate(probe, kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{_path(e.path)}: {e.message}"]
    return []
