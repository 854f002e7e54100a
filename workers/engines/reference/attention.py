"""Grouped-query attention: causal over a prompt, and paged over the KV cache for decode.

Decode attention is planned once per step (:class:`DecodeAttentionPlan`) and reused by every layer.
Measured on numpy/OpenBLAS, one batched computation over padded block tables wins for short
contexts (per-sequence Python overhead dominates), while a per-sequence loop wins for long ones
(padding wastes more than the loop costs). So short sequences are batched in groups of similar
length (power-of-two block counts, at most 2x padding) and long ones are attended one by one.
Both paths agree to ~1e-15, far below what could change a token.

Prompt attention (:func:`causal_attention`) also serves a prompt computed in chunks: the queries
are then the last rows of a longer key sequence whose first rows came from the cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from transport.errors import ErrorCode, PdorchError
from workers.engines.reference.layers import softmax_inplace

# Contexts up to this many tokens are attended in padded batches, longer ones one by one.
MAX_BATCHED_TOKENS = 256
# Prompt attention is computed in chunks of query rows to bound the [heads, rows, S] scores.
PREFILL_QUERY_CHUNK = 128


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Causal attention of the last ``len(q)`` positions of a sequence over all of it.

    ``q`` is ``[T, heads, head_dim]`` for positions ``S - T .. S - 1``; ``k`` and ``v`` are
    ``[S, kv_heads, head_dim]`` for positions ``0 .. S - 1`` (``S == T`` for a whole prompt).
    Returns ``[T, heads * head_dim]``.
    """
    num_tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    offset = k.shape[0] - num_tokens  # positions before the first query (already in the cache)
    if offset < 0:
        raise PdorchError(ErrorCode.INTERNAL, f"{num_tokens} queries cannot attend over {k.shape[0]} keys")
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim)  # a Python float, so float32 inputs stay float32
    q_grouped = (q * scale).reshape(num_tokens, kv_heads, group, head_dim).transpose(1, 2, 0, 3)
    k_t = k.transpose(1, 2, 0)[:, None]  # [kv_heads, 1, head_dim, S]
    v_t = v.transpose(1, 0, 2)[:, None]  # [kv_heads, 1, S, head_dim]
    out = np.empty((kv_heads, group, num_tokens, head_dim), dtype=q.dtype)
    chunk = min(num_tokens, PREFILL_QUERY_CHUNK)
    # Rows of a chunk see every earlier key; only the chunk's own square needs the causal mask.
    future = np.triu(np.full((chunk, chunk), -np.inf, dtype=q.dtype), k=1)
    for start in range(0, num_tokens, chunk):
        stop = min(num_tokens, start + chunk)
        scores = q_grouped[:, :, start:stop] @ k_t[..., : offset + stop]  # [kv_heads, group, rows, keys]
        scores[..., offset + start : offset + stop] += future[: stop - start, : stop - start]
        out[:, :, start:stop] = softmax_inplace(scores) @ v_t[:, :, : offset + stop]
    return out.transpose(2, 0, 1, 3).reshape(num_tokens, heads * head_dim)


class _PaddedGroup:
    """Short sequences attended together over block tables padded to the group's longest."""

    def __init__(
        self,
        rows: list[int],
        tables: Sequence[Sequence[int]],
        lengths: Sequence[int],
        block_size: int,
    ) -> None:
        width = max(len(t) for t in tables)
        self.rows = np.asarray(rows, dtype=np.intp)
        # Padding repeats a real block: cache contents are always finite, and masked out anyway.
        self.table = np.asarray([list(t) + [t[0]] * (width - len(t)) for t in tables], dtype=np.intp)
        span = width * block_size
        hidden = np.arange(span)[None, :] >= np.asarray(lengths)[:, None]
        self.bias = np.where(hidden, -np.inf, 0.0)[:, None, None, :]  # [G, 1, 1, span]
        self.span = span


class _Single:
    def __init__(self, row: int, table: Sequence[int], length: int) -> None:
        self.row = row
        self.table = np.asarray(table, dtype=np.intp)
        self.length = length


class DecodeAttentionPlan:
    """How one decode step's sequences are grouped for attention (shared by all layers).

    ``block_tables[i]`` must cover ``lengths[i]`` tokens (the new token included) and no more
    blocks than that.
    """

    def __init__(
        self,
        block_tables: Sequence[Sequence[int]],
        lengths: Sequence[int],
        block_size: int,
        kv_heads: int,
    ) -> None:
        self.kv_heads = kv_heads
        buckets: dict[int, list[int]] = {}
        self.singles: list[_Single] = []
        for row, (table, length) in enumerate(zip(block_tables, lengths, strict=True)):
            if len(table) * block_size <= MAX_BATCHED_TOKENS:
                buckets.setdefault((len(table) - 1).bit_length(), []).append(row)
            else:
                self.singles.append(_Single(row, table, length))
        self.groups = [
            _PaddedGroup(rows, [block_tables[r] for r in rows], [lengths[r] for r in rows], block_size)
            for _, rows in sorted(buckets.items())
        ]

    def run(self, q: np.ndarray, storage: np.ndarray) -> np.ndarray:
        """``q`` is ``[B, heads, head_dim]`` (already rotated); returns ``[B, heads * head_dim]``."""
        batch, heads, head_dim = q.shape
        q = q * (1.0 / math.sqrt(head_dim))
        out = np.empty((batch, heads, head_dim), dtype=q.dtype)
        for group in self.groups:
            out[group.rows] = self._run_group(group, q[group.rows], storage)
        for single in self.singles:
            out[single.row] = self._run_single(single, q[single.row], storage)
        return out.reshape(batch, heads * head_dim)

    def _run_group(self, group: _PaddedGroup, q: np.ndarray, storage: np.ndarray) -> np.ndarray:
        size, heads, head_dim = q.shape
        kv = storage[group.table].reshape(size, group.span, 2, self.kv_heads, head_dim)
        q_grouped = q.reshape(size, self.kv_heads, heads // self.kv_heads, head_dim)
        scores = q_grouped @ kv[:, :, 0].transpose(0, 2, 3, 1)  # [G, kv_heads, group, span]
        scores += group.bias
        mixed = softmax_inplace(scores) @ kv[:, :, 1].transpose(0, 2, 1, 3)  # [G, kv_heads, group, hd]
        return mixed.reshape(size, heads, head_dim)

    def _run_single(self, single: _Single, q: np.ndarray, storage: np.ndarray) -> np.ndarray:
        heads, head_dim = q.shape
        group = heads // self.kv_heads
        kv = storage[single.table].reshape(-1, 2, self.kv_heads, head_dim)[: single.length]
        scores = q.reshape(self.kv_heads, group, head_dim) @ kv[:, 0].transpose(1, 2, 0)
        mixed = softmax_inplace(scores) @ kv[:, 1].transpose(1, 0, 2)  # [kv_heads, group, head_dim]
        return mixed.reshape(heads, head_dim)
