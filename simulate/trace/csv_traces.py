"""CSV traces, told apart by their header.

* Azure LLM inference traces, 2023 (Splitwise) and 2024 (DynamoLLM, a week): ``TIMESTAMP`` (a
  date and time; 2024's carry a UTC offset), ``ContextTokens``, ``GeneratedTokens``.
* BurstGPT: ``Timestamp`` (seconds from the trace's start), ``Request tokens``, ``Response tokens``
  (0 for a request that failed in production; replayed as a one-token answer, as every loader here
  does with an empty output), and columns not read (``Model``, ``Log Type``, ...).
* ShareGPT conversation lengths (Sarathi-Serve's processed stats): ``num_prefill_tokens``,
  ``num_decode_tokens``, no timestamps and no prompt contents: a seeded sample of rows arriving as a
  Poisson process at a chosen rate.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from typing import IO, NamedTuple

import numpy as np

from simulate.trace.fields import bad_row, seconds, token_count
from simulate.trace.types import DEFAULT_MAX_TOKENS, Trace, TraceRequest, normalised
from transport.errors import ErrorCode, PdorchError


class TimedCsv(NamedTuple):
    """A CSV format with one request per row: which columns hold what."""

    name: str
    time: str
    prompt: str
    output: str


TIMED_FORMATS = (
    TimedCsv("Azure LLM inference trace", "TIMESTAMP", "ContextTokens", "GeneratedTokens"),
    TimedCsv("BurstGPT", "Timestamp", "Request tokens", "Response tokens"),
)
SHAREGPT_COLUMNS = ("num_prefill_tokens", "num_decode_tokens")


def load_csv(
    f: IO[str], source: str, name: str, *, limit: int, requests: int, rate_per_s: float, seed: int
) -> Trace:
    reader = csv.reader(f)
    header = [h.strip() for h in next(reader, [])]
    if all(c in header for c in SHAREGPT_COLUMNS):
        return _sharegpt(reader, header, source, requests=requests, rate_per_s=rate_per_s, seed=seed)
    for fmt in TIMED_FORMATS:
        if all(c in header for c in (fmt.time, fmt.prompt, fmt.output)):
            return _timed(reader, header, fmt, source, name, limit)
    known = "; ".join(f"{f.name}: {f.time}, {f.prompt}, {f.output}" for f in TIMED_FORMATS)
    raise PdorchError(
        ErrorCode.CONFIG,
        f"{source}: unknown CSV trace (header {header[:8]}); known formats by their columns: {known}; "
        f"ShareGPT lengths: {', '.join(SHAREGPT_COLUMNS)}",
    )


def _rows(
    reader: Iterator[list[str]], header: list[str], source: str
) -> Iterator[tuple[str, dict[str, str]]]:
    for row in reader:
        if not row or not any(cell.strip() for cell in row):
            continue  # a blank line
        where = f"{source}:{reader.line_num}"  # type: ignore[attr-defined]
        if len(row) < len(header):
            raise bad_row(where, f"{len(row)} fields where the header has {len(header)}")
        yield where, dict(zip(header, row, strict=False))


def _timed(
    reader: Iterator[list[str]], header: list[str], fmt: TimedCsv, source: str, name: str, limit: int
) -> Trace:
    rows: list[TraceRequest] = []
    for where, row in _rows(reader, header, source):
        rows.append(
            TraceRequest(
                arrival_s=seconds(row[fmt.time], where, fmt.time),
                prompt_len=max(1, token_count(row[fmt.prompt], where, fmt.prompt)),
                output_len=max(1, token_count(row[fmt.output], where, fmt.output)),
            )
        )
        if limit and len(rows) >= limit:
            break
    return normalised(name, rows, prefix_block_tokens=16)


def _sharegpt(
    reader: Iterator[list[str]],
    header: list[str],
    source: str,
    *,
    requests: int,
    rate_per_s: float,
    seed: int,
) -> Trace:
    """``requests`` rows drawn without replacement (seeded), arriving as a Poisson process."""
    if requests < 1 or not rate_per_s > 0:
        raise PdorchError(ErrorCode.CONFIG, "a ShareGPT workload needs requests >= 1 and a rate > 0")
    prompt, output = SHAREGPT_COLUMNS
    rows = [
        (token_count(r[prompt], where, prompt), token_count(r[output], where, output))
        for where, r in _rows(reader, header, source)
    ]
    if not rows:
        raise PdorchError(ErrorCode.CONFIG, f"trace {source} is empty")
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
    return normalised("sharegpt", reqs, prefix_block_tokens=16)
