"""A Llama-architecture GGUF file read as a Hugging Face checkpoint: hyperparameters, then every
weight dequantized to float32 under its Hugging Face name, in Hugging Face layout.

llama.cpp's converter permutes the rows of the Q and K projections so that RoPE rotates adjacent
pairs of dimensions (x[2i], x[2i+1]); Hugging Face's Llama (and vLLM, and pdorch's reference
engine) rotate the two halves of each head instead. :func:`unpermute_rope_rows` undoes the
permutation, so every consumer of the converted weights uses the rotate-half convention.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from transport.errors import ErrorCode, PdorchError


class LlamaHyperparams(msgspec.Struct, frozen=True, kw_only=True):
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    context_length: int
    rope_theta: float
    rms_norm_eps: float
    bos_token_id: int
    eos_token_id: int
    tied_embeddings: bool


# GGUF tensor names -> Hugging Face Llama names ({i}: the block index).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def unpermute_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: per head, rows (0, 1, 2, 3, ...) = (pair 0 first,
    pair 0 second, pair 1 first, ...) go back to (first halves..., second halves...)."""
    rows, cols = weight.shape
    head_dim = rows // heads
    return np.ascontiguousarray(
        weight.reshape(heads, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
    )


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK.fullmatch(gguf_name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        raise PdorchError(ErrorCode.CONFIG, f"unexpected tensor {gguf_name!r} in a Llama GGUF file")
    return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"


class GgufLlama:
    """An open GGUF file of architecture ``llama`` (reading it takes a few seconds: its metadata
    holds the whole vocabulary)."""

    def __init__(self, path: str | Path) -> None:
        from gguf import GGUFReader  # the reader is only needed to convert a file

        self.path = Path(path)
        try:
            self._reader = GGUFReader(self.path)
        except (OSError, ValueError) as e:
            raise PdorchError(ErrorCode.CONFIG, f"cannot read GGUF file {self.path}: {e}") from None
        architecture = self.field("general.architecture")
        if architecture != "llama":
            raise PdorchError(
                ErrorCode.CONFIG,
                f"{self.path.name}: architecture {architecture!r}, only 'llama' is supported",
            )
        self.hyperparams = self._hyperparams()

    def field(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def _required(self, key: str) -> Any:
        value = self.field(key)
        if value is None:
            raise PdorchError(ErrorCode.CONFIG, f"{self.path.name}: metadata {key!r} is missing")
        return value

    def _hyperparams(self) -> LlamaHyperparams:
        names = {t.name for t in self._reader.tensors}
        hidden = int(self._required("llama.embedding_length"))
        heads = int(self._required("llama.attention.head_count"))
        head_dim = int(self.field("llama.attention.key_length", hidden // heads))
        rope_dims = int(self.field("llama.rope.dimension_count", head_dim))
        if rope_dims != head_dim or "rope_freqs.weight" in names or self.field("llama.rope.scaling.type"):
            raise PdorchError(ErrorCode.CONFIG, f"{self.path.name}: partial or scaled RoPE is not supported")
        tokens = self._reader.fields.get("tokenizer.ggml.tokens")
        vocab = int(self.field("llama.vocab_size", len(tokens.data) if tokens is not None else 0))
        return LlamaHyperparams(
            vocab_size=vocab,
            hidden=hidden,
            layers=int(self._required("llama.block_count")),
            heads=heads,
            kv_heads=int(self.field("llama.attention.head_count_kv", heads)),
            head_dim=head_dim,
            ffn=int(self._required("llama.feed_forward_length")),
            context_length=int(self._required("llama.context_length")),
            # float32 in the file: its shortest decimal form is the value the model was made with.
            rope_theta=float(str(np.float32(self.field("llama.rope.freq_base", 10000.0)))),
            rms_norm_eps=float(str(np.float32(self._required("llama.attention.layer_norm_rms_epsilon")))),
            bos_token_id=int(self.field("tokenizer.ggml.bos_token_id", -1)),
            eos_token_id=int(self._required("tokenizer.ggml.eos_token_id")),
            tied_embeddings="output.weight" not in names,
        )

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(Hugging Face name, float32 weight) for every tensor, dequantized one at a time."""
        from gguf.quants import dequantize

        hp = self.hyperparams
        for tensor in self._reader.tensors:
            name = hf_name(tensor.name)
            try:
                weight = dequantize(tensor.data, tensor.tensor_type)
            except NotImplementedError as e:
                raise PdorchError(ErrorCode.CONFIG, f"{self.path.name}: {tensor.name}: {e}") from None
            weight = np.asarray(weight, dtype=np.float32).reshape(tuple(reversed(tensor.shape.tolist())))
            if name.endswith("q_proj.weight"):
                weight = unpermute_rope_rows(weight, hp.heads)
            elif name.endswith("k_proj.weight"):
                weight = unpermute_rope_rows(weight, hp.kv_heads)
            yield name, weight
