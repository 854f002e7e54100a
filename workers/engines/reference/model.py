"""The reference decoder-only transformer, computed with numpy.

Per layer: RMSNorm -> grouped-query attention with RoPE (causal) -> residual -> RMSNorm -> SwiGLU
MLP -> residual; then a final RMSNorm and the unembedding. Three entry points:

- :meth:`ReferenceModel.prefill` runs a prompt, or one chunk of it that starts at a position whose
  predecessors' KV already sits in the blocks (computed by earlier chunks or served from the prefix
  cache). It writes the new KV into the paged cache and hands each layer's KV of the whole sequence
  so far to a callback as soon as that layer's projections are done, so the KV plane can ship
  layer ``i`` while layers ``i+1..`` compute;
- :meth:`ReferenceModel.decode_step` advances a batch of sequences by one token each;
- :meth:`ReferenceModel.forward_full` recomputes everything without a cache (the test oracle).

A prompt chunk is always computed on its own (never batched with other prompts), so a prompt's KV
and first token are bit-identical on whichever worker computes them with the same chunking. Other
chunk boundaries (or a prefix taken from the cache) change results only at the ~1e-13 level in
float64: BLAS rounding depends on how many rows a matrix product has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from transport.errors import ErrorCode, PdorchError
from workers.engines.reference.attention import DecodeAttentionPlan, causal_attention
from workers.engines.reference.config import ModelConfig
from workers.engines.reference.kv_cache import PagedKvCache
from workers.engines.reference.layers import rms_norm, swiglu
from workers.engines.reference.lora.adapter import LoraAdapter
from workers.engines.reference.lora.apply import LoraGroups, add_update, groups_of
from workers.engines.reference.rope import RotaryEmbedding
from workers.engines.reference.weights import LayerWeights, ModelWeights, init_weights

# on_layer(layer_index, kv_rows[T, 2, kv_heads, head_dim]); the callee may keep kv_rows.
LayerKvCallback = Callable[[int, np.ndarray], None]
# Per layer: the new rows' KV in, the KV of every position attended over out.
_LayerContext = Callable[[int, np.ndarray], np.ndarray]
# One decode-batch entry: (token fed, its position, the sequence's block table).
DecodeEntry = tuple[int, int, Sequence[int]]


class ReferenceModel:
    def __init__(self, cfg: ModelConfig, weights: ModelWeights | None = None) -> None:
        """``weights`` from a checkpoint (``checkpoint.py``), or seeded random ones by default."""
        self.cfg = cfg
        self.weights = init_weights(cfg) if weights is None else weights
        self.rope = RotaryEmbedding(cfg)
        self._q_width = cfg.heads * cfg.head_dim
        self._kv_width = cfg.kv_heads * cfg.head_dim

    # ------------------------------------------------------------------ prompt (whole sequence)

    def prefill(
        self,
        token_ids: Sequence[int],
        cache: PagedKvCache,
        block_ids: Sequence[int],
        on_layer: LayerKvCallback | None = None,
        start: int = 0,
        all_logits: bool = False,
        adapter: LoraAdapter | None = None,
    ) -> np.ndarray:
        """Run prompt positions ``[start, start + len(token_ids))``; returns the last one's logits
        [vocab], or every one's [len(token_ids), vocab] with ``all_logits`` (prompt logprobs).

        Their KV is stored in ``block_ids``, which must already hold the KV of positions
        ``[0, start)``. ``on_layer`` gets each layer's KV rows of ALL positions
        ``[0, start + len(token_ids))`` (earlier ones gathered from the blocks) as a fresh array.
        """
        tokens = self._check_prompt(token_ids, start)

        def store_and_read(layer: int, new_rows: np.ndarray) -> np.ndarray:
            cache.scatter(layer, block_ids, start, new_rows)
            if start == 0:
                rows = new_rows  # attend over the very arrays that were stored
            else:
                rows = np.concatenate([cache.gather(layer, block_ids, start), new_rows])
            if on_layer is not None:
                on_layer(layer, rows)
            return rows

        lora: LoraGroups = [] if adapter is None else [(adapter, slice(None))]
        hidden = self._forward_sequence(tokens, start, store_and_read, lora)
        return self._logits(hidden) if all_logits else self._logits(hidden[-1:])[0]

    def forward_full(self, token_ids: Sequence[int], adapter: LoraAdapter | None = None) -> np.ndarray:
        """Logits for every position [T, vocab], recomputed from scratch without a cache."""
        lora: LoraGroups = [] if adapter is None else [(adapter, slice(None))]
        return self._logits(self._forward_sequence(self._check_prompt(token_ids, 0), 0, None, lora))

    def _forward_sequence(
        self, tokens: np.ndarray, start: int, context: _LayerContext | None, lora: LoraGroups
    ) -> np.ndarray:
        positions = np.arange(start, start + len(tokens))
        x = self.weights.embed[tokens]
        for index, layer in enumerate(self.weights.layers):
            q, k, v = self._qkv(index, layer, x, positions, lora)
            kv_rows = np.empty((len(tokens), *self.cfg.kv_row_shape), dtype=x.dtype)
            kv_rows[:, 0] = k
            kv_rows[:, 1] = v
            if context is not None:
                kv_rows = context(index, kv_rows)
            # Attend over the KV as stored, so later chunks and cached decode read identical values.
            x = x + self._out(index, layer, causal_attention(q, kv_rows[:, 0], kv_rows[:, 1]), lora)
            x = self._mlp(index, layer, x, lora)
        return x

    # ------------------------------------------------------------------ one token per sequence

    def decode_step(
        self,
        batch: Sequence[DecodeEntry],
        cache: PagedKvCache,
        adapters: Sequence[LoraAdapter | None] = (),
    ) -> np.ndarray:
        """Feed one token per sequence at its position; returns next-token logits [B, vocab].

        Writes each new token's KV at its position, then attends over positions 0..position of
        that sequence's own blocks. ``adapters``: each sequence's LoRA adapter (None: the base
        model); sequences of different adapters share the batch.
        """
        if not batch:
            return np.empty((0, self.cfg.vocab_size), dtype=self.cfg.np_dtype)
        tokens, positions, tables = self._check_batch(batch, cache)
        block_size = cache.block_size
        # Only the blocks that hold positions 0..position take part, so tables longer than needed
        # (blocks reserved ahead) do not widen the attention.
        used_tables = [table[: p // block_size + 1] for table, p in zip(tables, positions, strict=True)]
        write_blocks = np.asarray([table[-1] for table in used_tables], dtype=np.intp)
        write_offsets = positions % block_size
        plan = DecodeAttentionPlan(used_tables, (positions + 1).tolist(), block_size, self.cfg.kv_heads)
        lora = groups_of(adapters)
        x = self.weights.embed[tokens]
        for index, layer in enumerate(self.weights.layers):
            q, k, v = self._qkv(index, layer, x, positions, lora)
            storage = cache.layer_array(index)
            storage[write_blocks, write_offsets, 0] = k
            storage[write_blocks, write_offsets, 1] = v
            x = x + self._out(index, layer, plan.run(q, storage), lora)
            x = self._mlp(index, layer, x, lora)
        return self._logits(x)

    # ------------------------------------------------------------------ shared pieces

    def _qkv(
        self, index: int, layer: LayerWeights, x: np.ndarray, positions: np.ndarray, lora: LoraGroups
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = x.shape[0]
        head_dim = self.cfg.head_dim
        normed = rms_norm(x, layer.attn_norm, self.cfg.rms_norm_eps)
        qkv = normed @ layer.wqkv
        if lora:
            q_end = self._q_width
            k_end = q_end + self._kv_width
            add_update(qkv, normed, lora, index, "q_proj", slice(0, q_end))
            add_update(qkv, normed, lora, index, "k_proj", slice(q_end, k_end))
            add_update(qkv, normed, lora, index, "v_proj", slice(k_end, None))
        q = qkv[:, : self._q_width].reshape(n, self.cfg.heads, head_dim)
        k = qkv[:, self._q_width : self._q_width + self._kv_width].reshape(n, self.cfg.kv_heads, head_dim)
        v = qkv[:, self._q_width + self._kv_width :].reshape(n, self.cfg.kv_heads, head_dim)
        return self.rope.apply(q, positions), self.rope.apply(k, positions), v

    def _out(self, index: int, layer: LayerWeights, attended: np.ndarray, lora: LoraGroups) -> np.ndarray:
        out = attended @ layer.wo
        if lora:
            add_update(out, attended, lora, index, "o_proj")
        return out

    def _mlp(self, index: int, layer: LayerWeights, x: np.ndarray, lora: LoraGroups) -> np.ndarray:
        normed = rms_norm(x, layer.mlp_norm, self.cfg.rms_norm_eps)
        gate_up = normed @ layer.w_gate_up
        if lora:
            ffn = self.cfg.ffn
            add_update(gate_up, normed, lora, index, "gate_proj", slice(0, ffn))
            add_update(gate_up, normed, lora, index, "up_proj", slice(ffn, None))
        mixed = swiglu(gate_up)
        down = mixed @ layer.w_down
        if lora:
            add_update(down, mixed, lora, index, "down_proj")
        return x + down

    def _logits(self, x: np.ndarray) -> np.ndarray:
        return rms_norm(x, self.weights.final_norm, self.cfg.rms_norm_eps) @ self.weights.unembed

    def _check_prompt(self, token_ids: Sequence[int], start: int) -> np.ndarray:
        tokens = np.asarray(token_ids, dtype=np.intp)
        if tokens.ndim != 1 or tokens.size == 0:
            raise PdorchError(ErrorCode.INVALID_REQUEST, "prompt must be a non-empty list of token ids")
        if start < 0:
            raise PdorchError(ErrorCode.INTERNAL, f"prefill cannot start at negative position {start}")
        if start + tokens.size > self.cfg.max_model_len:
            raise PdorchError(
                ErrorCode.PROMPT_TOO_LONG,
                f"prompt has {start + tokens.size} tokens, the model allows {self.cfg.max_model_len}",
            )
        self._check_token_range(tokens)
        return tokens

    def _check_batch(
        self, batch: Sequence[DecodeEntry], cache: PagedKvCache
    ) -> tuple[np.ndarray, np.ndarray, list[Sequence[int]]]:
        tokens = np.asarray([entry[0] for entry in batch], dtype=np.intp)
        positions = np.asarray([entry[1] for entry in batch], dtype=np.intp)
        tables = [entry[2] for entry in batch]
        self._check_token_range(tokens)
        if positions.min() < 0 or positions.max() >= self.cfg.max_model_len:
            raise PdorchError(
                ErrorCode.INTERNAL, f"decode positions must be in [0, {self.cfg.max_model_len})"
            )
        for table, position in zip(tables, positions, strict=True):
            if len(table) < cache.blocks_for(position + 1):
                raise PdorchError(
                    ErrorCode.INTERNAL, f"block table of {len(table)} blocks cannot hold position {position}"
                )
        return tokens, positions, tables

    def _check_token_range(self, tokens: np.ndarray) -> None:
        if tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size:
            raise PdorchError(ErrorCode.INVALID_REQUEST, f"token ids must be in [0, {self.cfg.vocab_size})")
