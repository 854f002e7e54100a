"""Elementwise building blocks of the reference transformer."""

from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, gain: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis."""
    inv_rms = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return (x * inv_rms) * gain


def swiglu(gate_up: np.ndarray) -> np.ndarray:
    """SiLU(gate) * up, where the last axis holds gate then up."""
    gate, up = np.split(gate_up, 2, axis=-1)
    return gate / (1.0 + np.exp(-gate)) * up


def softmax_inplace(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, reusing ``scores`` (rows must hold at least one finite value)."""
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores
