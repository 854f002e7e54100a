"""Fuzz the scheduler's HTTP API with schemathesis against the OpenAPI document it serves.

Starts a local cluster (``pdorch up``'s: scheduler, a prefill and a decode worker on the
random-weight model, p2p KV, run-time LoRA loading on), points schemathesis at ``/openapi.json``
and fails on any 5xx answer. Schemathesis lives in a virtualenv of its own (``.venv-fuzz``, made
on first use), not in the project's: it is a tool, not a dependency.

Run: ``make fuzz`` or ``.venv/bin/python scripts/fuzz_http.py [--max-examples N] [--seed S]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from pdorch.launcher import ClusterSpec, LocalCluster
from workers.models.catalog import RANDOM_MODEL

REPO_ROOT = Path(__file__).resolve().parents[1]
FUZZ_VENV = REPO_ROOT / ".venv-fuzz"
SCHEMATHESIS = "schemathesis==4.32.5"


def schemathesis() -> Path:
    """The ``st`` command of the fuzzing virtualenv (made once)."""
    st = FUZZ_VENV / "bin" / "st"
    stamp = FUZZ_VENV / f"installed-{SCHEMATHESIS}"
    if not stamp.exists():
        print(f"installing {SCHEMATHESIS} into {FUZZ_VENV}", flush=True)
        venv.create(FUZZ_VENV, with_pip=True, clear=True)
        subprocess.run([FUZZ_VENV / "bin" / "python", "-m", "pip", "install", "-q", SCHEMATHESIS], check=True)
        stamp.touch()
    return st


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-examples", type=int, default=40, help="test cases per operation and phase")
    p.add_argument("--seed", type=int, default=1, help="schemathesis's random seed (reproducible runs)")
    p.add_argument("--workers", type=int, default=2, help="concurrent schemathesis workers")
    args = p.parse_args()
    st = schemathesis()
    with tempfile.TemporaryDirectory(prefix="pdorch-fuzz-") as tmp:
        # Run-time LoRA loading on (from an empty adapter directory), so its endpoints are fuzzed
        # past the switch that turns them off.
        adapters = Path(tmp) / "adapters"
        adapters.mkdir()
        spec = ClusterSpec(
            port=0, log_dir=Path(tmp), log_level="WARNING", model=RANDOM_MODEL, lora_root=adapters
        )
        cluster = LocalCluster(spec)
        try:
            cluster.start(timeout_s=120)
            command = [
                str(st),
                "run",
                f"{cluster.url}/openapi.json",
                "--checks",
                "not_a_server_error",
                "--max-examples",
                str(args.max_examples),
                "--seed",
                str(args.seed),
                "--workers",
                str(args.workers),
                "--request-timeout",
                "120",
                "--generation-database",
                "none",
                "--no-color",
            ]
            print("$", " ".join(command), flush=True)
            # Its own files (a cache) go to the temporary directory, not the work tree.
            return subprocess.run(command, check=False, cwd=tmp).returncode
        finally:
            cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
