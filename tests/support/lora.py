"""Small LoRA adapters in the PEFT layout, made from seeded random matrices, for tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from workers.engines.reference.config import ModelConfig
from workers.engines.reference.lora.adapter import TARGETS, projection_shapes


def write_adapter(
    path: Path,
    cfg: ModelConfig,
    seed: int,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    targets: tuple[str, ...] = TARGETS,
    magnitude: float = 0.5,
) -> Path:
    """A PEFT directory whose every targeted projection of every layer gets a seeded update (B is
    not zero, unlike a freshly initialised adapter, so the output changes)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    shapes = projection_shapes(cfg)
    tensors: dict[str, np.ndarray] = {}
    for layer in range(cfg.layers):
        for target in targets:
            fan_in, fan_out = shapes[target]
            module = "self_attn" if target.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{layer}.{module}.{target}"
            a = rng.standard_normal((rank, fan_in)) / np.sqrt(fan_in)
            b = rng.standard_normal((fan_out, rank)) * magnitude / np.sqrt(rank)
            tensors[f"{key}.lora_A.weight"] = a.astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = b.astype(np.float32)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "bias": "none",
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path
