"""A virtualenv of a bench's own, for the peers and clients it runs: never the project's."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path


def bench_venv(env: Path, pins: dict[str, str]) -> Path:
    """The interpreter of ``env`` with ``pins`` (name: version) installed; made once, then reused
    while a stamp naming the same pins is there."""
    python = env / "bin" / "python"
    stamp = env / ("installed-" + "-".join(f"{k}{v}" for k, v in pins.items()))
    if not stamp.exists():
        print(f"installing {', '.join(f'{k}=={v}' for k, v in pins.items())} into {env}", flush=True)
        if not python.exists():  # else an earlier install stopped half-way: pip resumes it
            venv.create(env, with_pip=True)
        subprocess.run(
            [python, "-m", "pip", "install", "-q", *(f"{k}=={v}" for k, v in pins.items())], check=True
        )
        stamp.touch()
    return python
