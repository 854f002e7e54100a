"""Finding the vLLM environment and the tiny test model, or skipping (failing in CI) without them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
VLLM_VENV = REPO_ROOT / ".venv-vllm"
BUILD_SCRIPT = Path(__file__).with_name("build_tiny_model.py")


def vllm_python() -> Path:
    """The vLLM environment's interpreter. Without it: skip, or fail when ``CI`` is set (CI must
    have run scripts/install_vllm.sh, so a missing vLLM there is a broken build, not a choice)."""
    python = VLLM_VENV / "bin" / "python"
    probe = None
    if python.exists():
        probe = subprocess.run(
            [str(python), "-c", "import vllm, torch"], capture_output=True, text=True, timeout=120, cwd="/"
        )
    if probe is None or probe.returncode != 0:
        why = "no .venv-vllm" if probe is None else f"vllm does not import: {probe.stderr.strip()[-300:]}"
        message = f"vLLM is not installed ({why}); run scripts/install_vllm.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return python


def build_tiny_model(python: Path, cache_dir: Path) -> Path:
    """The tiny Llama + tokenizer, built once into ``cache_dir`` (~5 s)."""
    out = cache_dir / "tiny-llama"
    if not (out / "BUILT").exists():
        done = subprocess.run(
            [str(python), str(BUILD_SCRIPT), str(out)], timeout=300, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"building the tiny model failed:\n{done.stderr[-2000:]}")
    return out
