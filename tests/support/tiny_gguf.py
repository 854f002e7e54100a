"""A tiny Llama GGUF file written the way llama.cpp's converter writes one: Q/K rows permuted for
adjacent-pair RoPE, Q8_0 projections, F32 norms, a tied embedding and a byte-level BPE vocabulary
with control tokens and a chat template. Lets the conversion be tested without a download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from tokenizers import pre_tokenizers

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN = 64, 2, 4, 2, 16, 128
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def vocabulary() -> list[str]:
    return SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt", "he", "Ġthe"]


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py ``permute``: HF rows -> adjacent-pair RoPE rows."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def hf_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Hugging Face-layout float32 weights of the tiny model (what the GGUF file encodes)."""
    rng = np.random.default_rng(seed)
    vocab = len(vocabulary())

    def dense(out: int, inp: int) -> np.ndarray:
        return (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((vocab, HIDDEN)).astype(np.float32)}
    w["model.norm.weight"] = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
        w[p + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
        w[p + "self_attn.q_proj.weight"] = dense(HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.k_proj.weight"] = dense(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.v_proj.weight"] = dense(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.o_proj.weight"] = dense(HIDDEN, HEADS * HEAD_DIM)
        w[p + "mlp.gate_proj.weight"] = dense(FFN, HIDDEN)
        w[p + "mlp.up_proj.weight"] = dense(FFN, HIDDEN)
        w[p + "mlp.down_proj.weight"] = dense(HIDDEN, FFN)
    return w


_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    _, _, index, rest = hf.split(".", 3)
    return f"blk.{index}.{_GGUF_NAMES[rest]}"


def write_tiny_gguf(
    path: Path, *, architecture: str = "llama", seed: int = 0, add_bos: bool = False
) -> dict[str, np.ndarray]:
    """Write the file; returns the Hugging Face-layout weights it encodes (before quantization)."""
    weights = hf_weights(seed)
    tokens = vocabulary()
    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, weight in weights.items():
        if name.endswith("q_proj.weight"):
            weight = llama_cpp_permute(weight, HEADS)
        elif name.endswith("k_proj.weight"):
            weight = llama_cpp_permute(weight, KV_HEADS)
        if weight.ndim == 1:
            writer.add_tensor(_gguf_name(name), weight)
            continue
        # The writer takes the quantized bytes and works out the element shape itself.
        data = quantize(weight, GGMLQuantizationType.Q8_0)
        writer.add_tensor(_gguf_name(name), data, raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights
