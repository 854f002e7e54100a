"""JSON Lines traces, told apart by their records.

* Mooncake (FAST'25 synthetic, conversation and tool-agent traces, the arXiv trace):
  ``timestamp`` (milliseconds), ``input_length``, ``output_length``, ``hash_ids`` (one id per
  512-token block of the prompt; equal ids = the same prefix, reusable).
* Qwen-Bailian (Alibaba's traces, ``qwen_*_blksz_16.jsonl``): the same lengths, ``timestamp`` in
  seconds, and ``chat_id``, ``parent_chat_id``, ``turn``, ``type``; its ``hash_ids`` hash each
  block's own tokens (16 per block, or the ``blksz_N`` in the file's name), so equal ids mean equal
  blocks, not equal prefixes: they are chained here, a block's id standing for the whole prefix up
  to it, which is what a prefix cache can reuse.
"""

from __future__ import annotations

import json
import re
from typing import IO

from simulate.trace.fields import bad_row, seconds, token_count
from simulate.trace.types import Trace, TraceRequest, normalised
from transport.errors import ErrorCode, PdorchError

MOONCAKE_BLOCK_TOKENS = 512
QWEN_BLOCK_TOKENS = 16
_QWEN_KEYS = ("chat_id", "turn")  # what a Qwen-Bailian record has and a Mooncake one has not
_BLOCK_SIZE_IN_NAME = re.compile(r"blksz_(\d+)")
_REQUIRED = ("timestamp", "input_length", "output_length")


class _PrefixIds:
    """Chained ids: equal for two requests' blocks exactly when all blocks up to there are equal."""

    def __init__(self) -> None:
        self._ids: dict[tuple[int, int], int] = {}

    def chain(self, block_ids: list[int]) -> tuple[int, ...]:
        out: list[int] = []
        prev = 0
        for b in block_ids:
            prev = self._ids.setdefault((prev, b), len(self._ids) + 1)  # never 0: 0 is "no template"
            out.append(prev)
        return tuple(out)


def load_jsonl(f: IO[str], source: str, name: str, *, limit: int) -> Trace:
    rows: list[TraceRequest] = []
    qwen: bool | None = None
    prefixes = _PrefixIds()
    for line_no, line in enumerate(f, 1):
        if not line.strip():
            continue
        where = f"{source}:{line_no}"
        try:
            r = json.loads(line)
        except ValueError as e:
            raise bad_row(where, f"not JSON ({e})") from None
        if not isinstance(r, dict):
            raise bad_row(where, f"a record must be a JSON object, got {type(r).__name__}")
        missing = [k for k in _REQUIRED if k not in r]
        if missing:
            raise PdorchError(
                ErrorCode.CONFIG,
                f"{where}: unknown JSONL trace record (no {', '.join(missing)}); known: Mooncake "
                "(timestamp ms, input_length, output_length, hash_ids) and Qwen-Bailian (the same with "
                "timestamp in s, chat_id, turn)",
            )
        if qwen is None:
            qwen = all(k in r for k in _QWEN_KEYS)
        blocks = _block_ids(r.get("hash_ids", []), where)
        rows.append(
            TraceRequest(
                arrival_s=seconds(r["timestamp"], where, "timestamp", per_second=1.0 if qwen else 1e3),
                prompt_len=max(1, token_count(r["input_length"], where, "input_length")),
                output_len=max(1, token_count(r["output_length"], where, "output_length")),
                # Mooncake's ids already name prefixes; offset by one so that no id is 0.
                hash_ids=prefixes.chain(blocks) if qwen else tuple(b + 1 for b in blocks),
            )
        )
        if limit and len(rows) >= limit:
            break
    if not qwen:
        return normalised(name, rows, prefix_block_tokens=MOONCAKE_BLOCK_TOKENS)
    m = _BLOCK_SIZE_IN_NAME.search(name)
    return normalised(name, rows, prefix_block_tokens=int(m.group(1)) if m else QWEN_BLOCK_TOKENS)


def _block_ids(value: object, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(b, int) and not isinstance(b, bool) for b in value):
        raise bad_row(where, "hash_ids must be a list of integers")
    if any(b < 0 for b in value):
        raise bad_row(where, "hash_ids must be >= 0")
    return value
