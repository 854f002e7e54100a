"""The placement bench on a trace file it has no name for: what a reader runs on a public trace
pdorch never saw."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_goodput_section_runs_on_any_trace_file(tmp_path: Path) -> None:
    rng = random.Random(3)
    rows = ["Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type"]
    t = 0.0
    for _ in range(400):
        t += rng.expovariate(1.0)
        p, o = rng.randint(50, 3000), rng.randint(0, 400)
        rows.append(f"{t:.0f},ChatGPT,{p},{o},{p + o},Conversation log")
    trace = tmp_path / "BurstGPT_sample.csv"
    trace.write_text("\n".join(rows) + "\n")
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "simulate_policies.py"), "--only", "goodput", "--shape", "1+1",
         "--trace-file", str(trace), "--limit", "300", "--policy", "pdorch", "--policy", "round-robin",
         "--precision", "0.3"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=True,
    ).stdout  # fmt: skip
    summary = out[out.index("### Summary") :]
    # Only the file was run (no named trace, no synthetic workload), under its own name.
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 1 and rows[0].startswith("| BurstGPT_sample | 1+1 | "), summary
