"""Where downloaded and converted models live: one cache directory per user, outside any checkout.

``$PDORCH_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/pdorch``, else ``~/.cache/pdorch``. Everything
in it can be deleted at any time: it is fetched or rebuilt on demand.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR_ENV = "PDORCH_CACHE_DIR"


def cache_root() -> Path:
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "pdorch"


def models_dir() -> Path:
    return cache_root() / "models"
