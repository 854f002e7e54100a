"""Real weights for the reference model: a Hugging Face Llama directory (``config.json`` and
``model.safetensors``), such as the one ``workers/models/hf_export.py`` makes from a GGUF file.

The weights are read once, cast to the compute dtype and laid out as the model multiplies them
(``x @ W``, with Q/K/V and gate/up fused); a tied embedding and output head share one array.
Rotate-half RoPE, as in Hugging Face's Llama, which is also the reference model's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from transport.errors import ErrorCode, PdorchError
from workers.engines.reference.config import ModelConfig
from workers.engines.reference.weights import LayerWeights, ModelWeights

WEIGHTS_FILE = "model.safetensors"


def _read_config(model_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise PdorchError(ErrorCode.CONFIG, f"cannot read {model_dir / 'config.json'}: {e}") from None
    if not isinstance(config, dict) or config.get("model_type") != "llama":
        raise PdorchError(ErrorCode.CONFIG, f"{model_dir}: not a Llama model (config.json model_type)")
    unsupported = {
        "hidden_act": config.get("hidden_act", "silu") != "silu",
        "rope_scaling": bool(config.get("rope_scaling")),
        "attention_bias": bool(config.get("attention_bias")),
        "mlp_bias": bool(config.get("mlp_bias")),
    }
    if any(unsupported.values()):
        names = ", ".join(k for k, bad in unsupported.items() if bad)
        raise PdorchError(ErrorCode.CONFIG, f"{model_dir}: unsupported Llama options: {names}")
    return config


def _first_id(value: Any, default: int) -> int:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) else default


def model_config(model_dir: Path, *, dtype: str = "float64", max_model_len: int = 0) -> ModelConfig:
    """The model's shape from its ``config.json``; ``max_model_len`` (if set) caps its context."""
    c = _read_config(model_dir)
    try:
        heads = int(c["num_attention_heads"])
        context = int(c.get("max_position_embeddings", 2048))
        return ModelConfig(
            vocab_size=int(c["vocab_size"]),
            hidden=int(c["hidden_size"]),
            layers=int(c["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or int(c["hidden_size"]) // heads),
            ffn=int(c["intermediate_size"]),
            max_model_len=min(context, max_model_len) if max_model_len > 0 else context,
            rope_theta=float(c.get("rope_theta", 10000.0)),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            dtype=dtype,
            eos_token_id=_first_id(c.get("eos_token_id"), -1),
            bos_token_id=_first_id(c.get("bos_token_id"), 0),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise PdorchError(ErrorCode.CONFIG, f"{model_dir}/config.json: bad or missing {e}") from None


def _tensor(tensors: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    weight = tensors.get(name)
    if weight is None:
        raise PdorchError(ErrorCode.CONFIG, f"{WEIGHTS_FILE} has no tensor {name!r}")
    if weight.shape != shape:
        raise PdorchError(ErrorCode.CONFIG, f"{name} is shaped {list(weight.shape)}, expected {list(shape)}")
    return weight


def load_weights(model_dir: Path, cfg: ModelConfig) -> ModelWeights:
    """Read ``model.safetensors`` into the reference model's layout, in ``cfg.dtype``."""
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(model_dir / WEIGHTS_FILE))
    except (OSError, ValueError) as e:
        raise PdorchError(ErrorCode.CONFIG, f"cannot read {model_dir / WEIGHTS_FILE}: {e}") from None
    dtype = cfg.np_dtype
    q_width, kv_width = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim

    def get(name: str, *shape: int) -> np.ndarray:
        return _tensor(tensors, name, shape)

    def dense(*parts: np.ndarray) -> np.ndarray:
        """Hugging Face ``[out, in]`` projections, fused along ``out``, as one ``[in, out]`` matrix."""
        return np.ascontiguousarray(np.concatenate(parts).T, dtype=dtype)

    def norm(name: str) -> np.ndarray:
        return get(name, cfg.hidden).astype(dtype)

    layers = []
    for i in range(cfg.layers):
        p = f"model.layers.{i}."
        layers.append(
            LayerWeights(
                attn_norm=norm(p + "input_layernorm.weight"),
                wqkv=dense(
                    get(p + "self_attn.q_proj.weight", q_width, cfg.hidden),
                    get(p + "self_attn.k_proj.weight", kv_width, cfg.hidden),
                    get(p + "self_attn.v_proj.weight", kv_width, cfg.hidden),
                ),
                wo=dense(get(p + "self_attn.o_proj.weight", cfg.hidden, q_width)),
                mlp_norm=norm(p + "post_attention_layernorm.weight"),
                w_gate_up=dense(
                    get(p + "mlp.gate_proj.weight", cfg.ffn, cfg.hidden),
                    get(p + "mlp.up_proj.weight", cfg.ffn, cfg.hidden),
                ),
                w_down=dense(get(p + "mlp.down_proj.weight", cfg.hidden, cfg.ffn)),
            )
        )
    embedding = get("model.embed_tokens.weight", cfg.vocab_size, cfg.hidden)
    if "lm_head.weight" in tensors:
        embed = np.ascontiguousarray(embedding, dtype=dtype)
        unembed = dense(_tensor(tensors, "lm_head.weight", (cfg.vocab_size, cfg.hidden)))
    else:
        # Tied: one copy, laid out for the output head (a contiguous [hidden, vocab] multiplies
        # ~20% faster than a transposed view); the embedding looks rows up through its transpose.
        unembed = dense(embedding)
        embed = unembed.T
    return ModelWeights(
        embed=embed, layers=tuple(layers), final_norm=norm("model.norm.weight"), unembed=unembed
    )


def load_checkpoint(
    model_dir: str | Path, *, dtype: str = "float64", max_model_len: int = 0
) -> tuple[ModelConfig, ModelWeights]:
    path = Path(model_dir)
    cfg = model_config(path, dtype=dtype, max_model_len=max_model_len)
    return cfg, load_weights(path, cfg)
