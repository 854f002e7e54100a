"""The reference model's weights, and seeded random ones (real ones come from ``checkpoint.py``).

Random matrices are drawn from N(0, 1/fan_in) so every projection keeps activations O(1); the embedding is
N(0, 1) and norm gains are 1. The same config (and seed) gives bit-identical weights on every
worker, which is what lets a prefill worker and a decode worker continue each other's work.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workers.engines.reference.config import ModelConfig


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: np.ndarray  # [hidden]
    wqkv: np.ndarray  # [hidden, (heads + 2 * kv_heads) * head_dim]
    wo: np.ndarray  # [heads * head_dim, hidden]
    mlp_norm: np.ndarray  # [hidden]
    w_gate_up: np.ndarray  # [hidden, 2 * ffn]
    w_down: np.ndarray  # [ffn, hidden]


@dataclass(frozen=True)
class ModelWeights:
    embed: np.ndarray  # [vocab, hidden]
    layers: tuple[LayerWeights, ...]
    final_norm: np.ndarray  # [hidden]
    unembed: np.ndarray  # [hidden, vocab]; tied to the embedding: embed is unembed.T (a view)


def init_weights(cfg: ModelConfig) -> ModelWeights:
    rng = np.random.default_rng(cfg.seed)
    dtype = cfg.np_dtype

    def dense(fan_in: int, fan_out: int) -> np.ndarray:
        return (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(dtype)

    qkv_width = (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim
    layers = tuple(
        LayerWeights(
            attn_norm=np.ones(cfg.hidden, dtype=dtype),
            wqkv=dense(cfg.hidden, qkv_width),
            wo=dense(cfg.heads * cfg.head_dim, cfg.hidden),
            mlp_norm=np.ones(cfg.hidden, dtype=dtype),
            w_gate_up=dense(cfg.hidden, 2 * cfg.ffn),
            w_down=dense(cfg.ffn, cfg.hidden),
        )
        for _ in range(cfg.layers)
    )
    return ModelWeights(
        embed=rng.standard_normal((cfg.vocab_size, cfg.hidden)).astype(dtype),
        layers=layers,
        final_norm=np.ones(cfg.hidden, dtype=dtype),
        unembed=dense(cfg.hidden, cfg.vocab_size),
    )
