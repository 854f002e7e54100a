"""Workload traces for the simulator: public trace files, a synthetic generator, rate scaling.

* Azure LLM inference trace 2023, code (Splitwise): CSV ``TIMESTAMP, ContextTokens, GeneratedTokens``.
* Mooncake FAST'25 synthetic trace: JSONL ``timestamp`` (ms), ``input_length``, ``output_length``,
  ``hash_ids`` (one id per 512-token prefix block; equal ids = the same prefix, reusable).
* ShareGPT conversation lengths (Sarathi-Serve's processed stats): CSV ``num_prefill_tokens``,
  ``num_decode_tokens``, no timestamps and no prompt contents: a seeded sample of rows arriving as a
  Poisson process at a chosen rate.

None records ``max_tokens``; we assume :data:`DEFAULT_MAX_TOKENS` for every request (above every
output in all three), which the predictor may use as a feature and a cap.
"""

from __future__ import annotations

import csv
import json
from datetime import datetime
from pathlib import Path

import msgspec
import numpy as np

from transport.errors import ErrorCode, PdorchError

DEFAULT_MAX_TOKENS = 4096
MOONCAKE_BLOCK_TOKENS = 512


class TraceRequest(msgspec.Struct, frozen=True, gc=False):
    arrival_s: float
    prompt_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()  # chained prefix-block ids (equal id = equal whole prefix)
    tenant: str = ""
    max_tokens: int = DEFAULT_MAX_TOKENS
    adapter: str = ""  # the LoRA adapter it runs with ("" = the base model); see simulate/adapters.py


class Trace(msgspec.Struct, frozen=True):
    name: str
    requests: tuple[TraceRequest, ...]
    prefix_block_tokens: int = 16  # tokens covered by one hash id

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s - self.requests[0].arrival_s if self.requests else 0.0

    def head(self, n: int) -> Trace:
        return Trace(self.name, self.requests[:n], self.prefix_block_tokens)

    def scaled(self, rate_scale: float) -> Trace:
        """The same requests arriving ``rate_scale`` times as fast (timestamps divided by it)."""
        if not rate_scale > 0:
            raise PdorchError(ErrorCode.CONFIG, f"rate scale must be > 0, got {rate_scale}")
        reqs = tuple(msgspec.structs.replace(r, arrival_s=r.arrival_s / rate_scale) for r in self.requests)
        return Trace(self.name, reqs, self.prefix_block_tokens)


def _parse_azure_time(text: str) -> float:
    # "2023-11-16 18:17:03.9799600": seven fractional digits, more than strptime's %f takes.
    whole, _, frac = text.strip().partition(".")
    base = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").timestamp()
    return base + (float("0." + frac) if frac else 0.0)


def load_azure_csv(path: Path, name: str = "azure-code") -> Trace:
    rows: list[TraceRequest] = []
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            rows.append(
                TraceRequest(
                    arrival_s=_parse_azure_time(row["TIMESTAMP"]),
                    prompt_len=max(1, int(row["ContextTokens"])),
                    output_len=max(1, int(row["GeneratedTokens"])),
                )
            )
    return _normalised(name, rows, prefix_block_tokens=16)


def load_mooncake_jsonl(path: Path, name: str = "mooncake") -> Trace:
    rows: list[TraceRequest] = []
    with Path(path).open() as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            rows.append(
                TraceRequest(
                    arrival_s=float(r["timestamp"]) / 1e3,
                    prompt_len=max(1, int(r["input_length"])),
                    output_len=max(1, int(r["output_length"])),
                    # Offset by one so that no id is 0 (0 means "no template" to the predictor).
                    hash_ids=tuple(int(h) + 1 for h in r.get("hash_ids", ())),
                )
            )
    return _normalised(name, rows, prefix_block_tokens=MOONCAKE_BLOCK_TOKENS)


def load_sharegpt_csv(
    path: Path, name: str = "sharegpt", *, requests: int = 4000, rate_per_s: float = 1.0, seed: int = 0
) -> Trace:
    """``requests`` rows drawn without replacement (seeded), arriving as a Poisson process."""
    if requests < 1 or not rate_per_s > 0:
        raise PdorchError(ErrorCode.CONFIG, "a ShareGPT workload needs requests >= 1 and a rate > 0")
    with Path(path).open(newline="") as f:
        rows = [
            (int(float(r["num_prefill_tokens"])), int(float(r["num_decode_tokens"])))
            for r in csv.DictReader(f)
        ]
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(rows), size=min(requests, len(rows)), replace=False)
    gaps = rng.exponential(1.0 / rate_per_s, size=len(picked))
    arrivals = np.cumsum(gaps) - gaps[0]
    reqs = [
        TraceRequest(
            arrival_s=float(t),
            prompt_len=max(1, rows[j][0]),
            output_len=max(1, min(rows[j][1], DEFAULT_MAX_TOKENS)),
        )
        for t, j in zip(arrivals, picked, strict=True)
    ]
    return _normalised(name, reqs, prefix_block_tokens=16)


def load_trace(path: Path, *, requests: int = 4000, rate_per_s: float = 1.0, seed: int = 0) -> Trace:
    """A trace file by its format. ``requests``, ``rate_per_s`` and ``seed`` shape the arrivals of a
    trace that has no timestamps (ShareGPT lengths)."""
    p = Path(path)
    if not p.exists():
        raise PdorchError(ErrorCode.CONFIG, f"trace file {p} not found")
    if p.suffix == ".csv":
        with p.open(newline="") as f:
            header = next(csv.reader(f), [])
        if "num_prefill_tokens" in header:
            return load_sharegpt_csv(p, "sharegpt", requests=requests, rate_per_s=rate_per_s, seed=seed)
        return load_azure_csv(p, name=p.stem)
    if p.suffix in (".jsonl", ".json"):
        return load_mooncake_jsonl(p, name=p.stem)
    raise PdorchError(ErrorCode.CONFIG, f"unknown trace format {p.suffix!r} (expected .csv or .jsonl)")


def _normalised(name: str, rows: list[TraceRequest], prefix_block_tokens: int) -> Trace:
    if not rows:
        raise PdorchError(ErrorCode.CONFIG, f"trace {name} is empty")
    rows.sort(key=lambda r: r.arrival_s)
    t0 = rows[0].arrival_s
    reqs = tuple(msgspec.structs.replace(r, arrival_s=r.arrival_s - t0) for r in rows)
    return Trace(name, reqs, prefix_block_tokens)
