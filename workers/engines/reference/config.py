"""Shape and numerics of the reference model.

The defaults describe a tiny byte-level model with seeded random weights: ids 0..255 are raw bytes,
256 is BOS, 257 is EOS, 258 and 259 are spare. A real checkpoint (``checkpoint.py``) fills in its
own shape. Either computes in float64 by default, on purpose: BLAS results for one row depend
slightly on how many rows are in the batch and where the row sits in it (float32 differences reach
~1e-6 of a logit here, enough to flip near-ties), and float64 keeps them around 1e-14, so continuous
batching yields the same tokens as running alone and disaggregated output equals colocated output.
``docs/benchmarks.md`` has the measurements behind that choice.
"""

from __future__ import annotations

import msgspec
import numpy as np

from transport.errors import ErrorCode, PdorchError

SUPPORTED_DTYPES = ("float32", "float64")


class ModelConfig(msgspec.Struct, frozen=True, kw_only=True):
    vocab_size: int = 260
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    ffn: int = 256
    max_model_len: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    seed: int = 0
    dtype: str = "float64"
    eos_token_id: int = 257
    bos_token_id: int = 256

    def __post_init__(self) -> None:
        sizes = {
            "vocab_size": self.vocab_size,
            "hidden": self.hidden,
            "layers": self.layers,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "ffn": self.ffn,
            "max_model_len": self.max_model_len,
        }
        for name, value in sizes.items():
            if value <= 0:
                raise PdorchError(ErrorCode.CONFIG, f"model {name} must be positive, got {value}")
        if self.heads % self.kv_heads != 0:
            raise PdorchError(
                ErrorCode.CONFIG,
                f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})",
            )
        if self.head_dim % 2 != 0:
            # RoPE rotates pairs of dimensions.
            raise PdorchError(ErrorCode.CONFIG, f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_theta <= 1.0:
            raise PdorchError(ErrorCode.CONFIG, f"rope_theta must be > 1, got {self.rope_theta}")
        if not 0.0 < self.rms_norm_eps < 1.0:
            raise PdorchError(ErrorCode.CONFIG, f"rms_norm_eps must be in (0, 1), got {self.rms_norm_eps}")
        if self.seed < 0:
            raise PdorchError(ErrorCode.CONFIG, f"weight seed must be >= 0, got {self.seed}")
        if self.dtype not in SUPPORTED_DTYPES:
            raise PdorchError(
                ErrorCode.CONFIG, f"dtype must be one of {SUPPORTED_DTYPES}, got {self.dtype!r}"
            )
        for name, token in (("eos_token_id", self.eos_token_id), ("bos_token_id", self.bos_token_id)):
            if not 0 <= token < self.vocab_size:
                raise PdorchError(
                    ErrorCode.CONFIG, f"{name} ({token}) must be in [0, vocab_size={self.vocab_size})"
                )

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def kv_row_shape(self) -> tuple[int, int, int]:
        """One token's KV in one layer: (K and V, kv_heads, head_dim)."""
        return (2, self.kv_heads, self.head_dim)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * self.np_dtype.itemsize
