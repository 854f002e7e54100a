"""How a layer is cut into chunks: along axis 0 (rows), each chunk at most ``max_chunk_bytes``."""

from __future__ import annotations

from transport.codec import MAX_FRAME_BYTES
from transport.errors import ErrorCode, PdorchError


def rows_per_chunk(row_bytes: int, max_chunk_bytes: int) -> int:
    """How many whole rows fit in one chunk (at least one; a row never spans two frames)."""
    if row_bytes <= 0:
        raise PdorchError(ErrorCode.INVALID_REQUEST, "a KV row must hold at least one byte")
    if row_bytes > MAX_FRAME_BYTES:
        limit = f"the {MAX_FRAME_BYTES}-byte frame limit"
        raise PdorchError(ErrorCode.INVALID_REQUEST, f"a KV row of {row_bytes} bytes exceeds {limit}")
    return max(1, min(max_chunk_bytes, MAX_FRAME_BYTES) // row_bytes)


def chunk_spans(total_rows: int, per_chunk: int) -> list[tuple[int, int]]:
    """``(row_offset, rows)`` of each chunk covering ``total_rows`` rows in order."""
    return [(start, min(per_chunk, total_rows - start)) for start in range(0, total_rows, per_chunk)]
