"""A Llama GGUF file converted into a Hugging Face directory: the RoPE permutation undone, weights
dequantized, the tokenizer and chat template rebuilt, and the reference engine loading the result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from scheduler.tokenizer.hf import HfTokenizer
from tests.support import tiny_gguf
from transport.errors import ErrorCode, PdorchError
from workers.engines.reference.checkpoint import load_checkpoint
from workers.engines.reference.config import ModelConfig
from workers.engines.reference.kv_cache import BlockAllocator, PagedKvCache
from workers.engines.reference.model import ReferenceModel
from workers.engines.reference.rope import RotaryEmbedding
from workers.models.gguf_llama import hf_name, unpermute_rope_rows
from workers.models.hf_export import export_hf, is_exported


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("tiny-gguf")
    weights = tiny_gguf.write_tiny_gguf(root / "tiny.gguf")
    return export_hf(root / "tiny.gguf", root / "hf", source_sha256="test"), weights


@pytest.mark.parametrize("heads", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permutation(heads: int) -> None:
    weight = np.random.default_rng(heads).standard_normal((heads * 8, 5))
    assert np.array_equal(unpermute_rope_rows(tiny_gguf.llama_cpp_permute(weight, heads), heads), weight)


def _rotate_adjacent_pairs(x: np.ndarray, position: int, theta: float) -> np.ndarray:
    """llama.cpp's RoPE: pair (x[2i], x[2i+1]) turns by position * theta^(-2i/d)."""
    d = x.shape[-1]
    angle = position * theta ** (-np.arange(0, d, 2) / d)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * np.cos(angle) - odd * np.sin(angle)
    out[..., 1::2] = odd * np.cos(angle) + even * np.sin(angle)
    return out


def test_adjacent_pair_rope_on_gguf_rows_equals_rotate_half_on_unpermuted_rows() -> None:
    """Why un-permuting is right: attention scores come out the same either way."""
    heads, head_dim, hidden, theta = 3, 16, 24, 10000.0
    rng = np.random.default_rng(0)
    wq, wk = rng.standard_normal((2, heads * head_dim, hidden))
    x_q, x_k = rng.standard_normal((2, hidden))
    pq, pk = 7, 3
    gguf_q = (tiny_gguf.llama_cpp_permute(wq, heads) @ x_q).reshape(heads, head_dim)
    gguf_k = (tiny_gguf.llama_cpp_permute(wk, heads) @ x_k).reshape(heads, head_dim)
    llama_cpp = np.einsum(
        "hd,hd->h", _rotate_adjacent_pairs(gguf_q, pq, theta), _rotate_adjacent_pairs(gguf_k, pk, theta)
    )
    rope = RotaryEmbedding(ModelConfig(head_dim=head_dim, rope_theta=theta, max_model_len=16))
    hf_q = rope.apply((wq @ x_q).reshape(1, heads, head_dim), np.array([pq]))[0]
    hf_k = rope.apply((wk @ x_k).reshape(1, heads, head_dim), np.array([pk]))[0]
    np.testing.assert_allclose(np.einsum("hd,hd->h", hf_q, hf_k), llama_cpp, rtol=1e-12)


def test_gguf_names_map_to_hugging_face_names() -> None:
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    with pytest.raises(PdorchError, match="unexpected tensor"):
        hf_name("blk.0.attn_q_norm.weight")


def test_export_writes_a_hugging_face_llama(exported: tuple[Path, dict[str, np.ndarray]]) -> None:
    out, original = exported
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    assert (config["rms_norm_eps"], config["rope_theta"], config["eos_token_id"]) == (1e-5, 10000.0, 2)
    with safe_open(str(out / "model.safetensors"), framework="np") as f:
        assert f.metadata() == {"format": "pt"}  # what transformers and vLLM require
    converted = load_file(str(out / "model.safetensors"))
    assert set(converted) == set(original)  # tied: no lm_head
    for name, weight in original.items():
        # Q8_0 rounds each value by at most half a step of its block's scale; a wrong row order
        # would be off by the weights themselves.
        np.testing.assert_allclose(converted[name], weight, atol=np.abs(weight).max() / 127, err_msg=name)
    assert is_exported(out, "test") and not is_exported(out, "another file")


def test_exported_tokenizer_and_chat_template(exported: tuple[Path, dict[str, np.ndarray]]) -> None:
    out, _ = exported
    tok = HfTokenizer(out)
    vocab = tiny_gguf.vocabulary()
    ids = tok.encode("the theme 12")
    assert [vocab[i] for i in ids] == ["t", "he", "Ġthe", "m", "e", "Ġ", "1", "2"]  # merges; digits split
    chat = tok.apply_chat_template([("user", "the")])
    assert chat[0] == 1 and 2 in chat, "control tokens are single tokens, not characters"
    assert tok.render_chat([("user", "the")]).endswith("<|im_start|>assistant\n")
    assert tok.eos_token_id == 2
    assert tok.decode(ids) == "the theme 12"


def test_a_model_that_wants_a_bos_gets_one_on_plain_text(tmp_path: Path) -> None:
    tiny_gguf.write_tiny_gguf(tmp_path / "bos.gguf", add_bos=True)
    tok = HfTokenizer(export_hf(tmp_path / "bos.gguf", tmp_path / "hf", source_sha256="bos"))
    assert (
        tok.encode("the")[0] == 1 and tok.encode("the")[1:] == HfTokenizer(tmp_path / "hf").encode("the")[1:]
    )
    assert tok.apply_chat_template([("user", "the")]).count(1) == 2, "the template's markup, no extra BOS"
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["add_bos_token"] is True


def test_the_reference_engine_serves_the_export(exported: tuple[Path, dict[str, np.ndarray]]) -> None:
    out, _ = exported
    cfg, weights = load_checkpoint(out, max_model_len=128)
    assert (cfg.layers, cfg.heads, cfg.kv_heads, cfg.max_model_len, cfg.rms_norm_eps) == (2, 4, 2, 128, 1e-5)
    assert weights.embed.base is weights.unembed, "a tied embedding and head share one array"
    model = ReferenceModel(cfg, weights)
    prompt = HfTokenizer(out).encode("the theme")
    cache = PagedKvCache(cfg, 8, 16)
    blocks = BlockAllocator(8).allocate(2)
    np.testing.assert_allclose(
        model.prefill(prompt, cache, blocks), model.forward_full(prompt)[-1], atol=1e-10
    )


def test_only_llama_files_are_converted(tmp_path: Path) -> None:
    tiny_gguf.write_tiny_gguf(tmp_path / "other.gguf", architecture="gpt2")
    with pytest.raises(PdorchError) as caught:
        export_hf(tmp_path / "other.gguf", tmp_path / "hf", source_sha256="x")
    assert caught.value.code is ErrorCode.CONFIG and "only 'llama'" in caught.value.message
    assert not (tmp_path / "hf").exists() and list(tmp_path.iterdir()) == [tmp_path / "other.gguf"]
