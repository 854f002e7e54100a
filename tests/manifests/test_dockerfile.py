"""The container images: one Dockerfile, a slim pdorch image (default) and a vLLM + pdorch one.

No image is built here (no container runtime in CI); instead the build context that
``.dockerignore`` leaves is assembled and checked to hold everything ``pip install .`` reads.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import tomllib
from pathlib import Path

import setuptools

from tests.manifests.targets import REPO, rendered

DOCKERFILE = REPO / "Dockerfile"


def stages() -> list[tuple[str, str, list[str]]]:
    """(base image, stage name, instructions) per FROM, in order."""
    out: list[tuple[str, str, list[str]]] = []
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if m:
            out.append((m.group(1), m.group(2) or "", []))
        elif out:
            out[-1][2].append(line)
    return out


def test_default_image_is_slim_python_with_the_pdorch_entrypoint() -> None:
    base, name, lines = stages()[-1]  # the last stage is what a plain `docker build` produces
    assert (base, name) == ("python:3.11-slim", "pdorch")
    text = "\n".join(lines)
    assert "pip install /tmp/pdorch-src" in text
    assert 'ENTRYPOINT ["pdorch"]' in text
    user = re.search(r"^USER (\d+):(\d+)$", text, re.MULTILINE)
    assert user is not None
    # The manifests run these images as that user.
    uids = {
        c.get("securityContext", {}).get("runAsUser") or t["spec"].get("securityContext", {}).get("runAsUser")
        for o in rendered("overlays/reference-cpu")
        if o["kind"] in ("Deployment", "LeaderWorkerSet")
        for t in (
            [o["spec"]["template"]]
            if o["kind"] == "Deployment"
            else [o["spec"]["leaderWorkerTemplate"]["workerTemplate"]]
        )
        for c in t["spec"]["containers"]
    }
    assert uids == {int(user.group(1))}


def test_vllm_image_adds_pdorch_to_a_vllm_base() -> None:
    (base, name, lines), *_ = stages()
    assert name == "vllm" and base == "${VLLM_IMAGE}"
    default = re.search(r"^ARG VLLM_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert default is not None and default.group(1).startswith("vllm/vllm-openai:v")
    assert any("pip install" in line and "/tmp/pdorch-src" in line for line in lines)


def _ignored(relative: str, patterns: list[str]) -> bool:
    # .dockerignore semantics for the patterns used: relative to the context root, "**/" = any depth,
    # and a directory that matches excludes everything below it.
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatch(part, pattern[3:]) for part in parts):
                return True
        elif any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            return True
    return False


def test_build_context_holds_the_package(tmp_path: Path) -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".git", ".venv", "tests", "manifests"} <= set(patterns)
    context = tmp_path / "context"
    ignored: list[str] = []
    for folder, dirs, files in os.walk(REPO):
        here = Path(folder).relative_to(REPO).as_posix()
        rel = [f"{here}/{n}" if here != "." else n for n in dirs]
        dirs[:] = [n for n, r in zip(dirs, rel, strict=True) if not _ignored(r, patterns)]  # prune
        for name in files:
            relative = f"{here}/{name}" if here != "." else name
            if _ignored(relative, patterns):
                ignored.append(relative)
            else:
                (context / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / relative, context / relative)
    assert not (context / "tests").exists() and not (context / ".venv").exists()

    # Everything `pip install .` reads must be in the context: the project file, its readme, and
    # every file of the packages it ships (modules and package data).
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert (context / "pyproject.toml").is_file()
    assert (context / project["project"]["readme"]).is_file()
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = set(setuptools.find_packages(where=str(REPO), include=include))
    assert {"pdorch", "scheduler.kubernetes", "transport", "workers"} <= shipped
    assert set(setuptools.find_packages(where=str(context), include=include)) == shipped
    folders = {package.replace(".", "/") for package in shipped}
    lost = [f for f in ignored if f.rsplit("/", 1)[0] in folders and not f.endswith(".pyc")]
    assert lost == [], "files of shipped packages left out of the build context"
