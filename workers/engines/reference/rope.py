"""Rotary position embedding (the "rotate half" layout)."""

from __future__ import annotations

import numpy as np

from workers.engines.reference.config import ModelConfig


class RotaryEmbedding:
    def __init__(self, cfg: ModelConfig) -> None:
        half = cfg.head_dim // 2
        inv_freq = cfg.rope_theta ** (-np.arange(half, dtype=np.float64) / half)
        angles = np.outer(np.arange(cfg.max_model_len, dtype=np.float64), inv_freq)
        # Tables in the model dtype so rotation does not upcast float32 activations.
        self._cos = np.cos(angles).astype(cfg.np_dtype)
        self._sin = np.sin(angles).astype(cfg.np_dtype)
        self._half = half

    def apply(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Rotate ``x`` shaped ``[n, heads, head_dim]`` by each row's position (``positions[n]``)."""
        cos = self._cos[positions][:, None, :]
        sin = self._sin[positions][:, None, :]
        first, second = x[..., : self._half], x[..., self._half :]
        out = np.empty_like(x)
        out[..., : self._half] = first * cos - second * sin
        out[..., self._half :] = second * cos + first * sin
        return out
