"""Open a trace file (plain or gzip-compressed) and read it by its format."""

from __future__ import annotations

import gzip
from pathlib import Path

from simulate.trace.csv_traces import load_csv
from simulate.trace.jsonl_traces import load_jsonl
from simulate.trace.types import Trace
from transport.errors import ErrorCode, PdorchError


def load_trace(
    path: Path, *, requests: int = 4000, rate_per_s: float = 1.0, seed: int = 0, limit: int = 0
) -> Trace:
    """A trace file by its format (csv_traces.py and jsonl_traces.py list them). ``requests``,
    ``rate_per_s`` and ``seed`` shape the arrivals of a trace that has no timestamps (ShareGPT
    lengths); ``limit`` > 0 reads only the file's first ``limit`` requests (a week-long trace is
    tens of millions of rows)."""
    p = Path(path)
    if not p.is_file():
        raise PdorchError(ErrorCode.CONFIG, f"trace file {p} not found")
    suffixes = [s.lower() for s in p.suffixes]
    compressed = suffixes[-1:] == [".gz"]
    kind = "".join((suffixes[:-1] if compressed else suffixes)[-1:])
    if kind not in (".csv", ".jsonl", ".json"):
        raise PdorchError(
            ErrorCode.CONFIG,
            f"unknown trace format {''.join(p.suffixes)!r} (expected .csv or .jsonl, or either .gz)",
        )
    name, limit = p.name.split(".")[0], max(0, limit)
    opener = gzip.open if compressed else open
    try:
        with opener(p, "rt", encoding="utf-8-sig", newline="") as f:
            if kind == ".csv":
                return load_csv(
                    f, str(p), name, limit=limit, requests=requests, rate_per_s=rate_per_s, seed=seed
                )
            return load_jsonl(f, str(p), name, limit=limit)
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise PdorchError(ErrorCode.CONFIG, f"cannot read trace {p}: {e}") from None
