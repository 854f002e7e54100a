"""A LoRA adapter in the reference model's layout, read from the standard PEFT directory.

PEFT writes ``adapter_config.json`` (``r``, ``lora_alpha``, ``target_modules``, ...) and
``adapter_model.safetensors`` with, per adapted projection, ``lora_A`` ``[r, in]`` and ``lora_B``
``[out, r]`` under the base model's module names. The adapted projection computes
``x @ W + scale * (x @ A.T) @ B.T`` with ``scale = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA);
here ``A.T`` and ``scale * B.T`` are stored ready to multiply.

An adapter's ``salt`` names its exact weights (its name and a digest of the file), so prefix-cache
keys of one adapter never match another's, nor those of a reloaded adapter whose file changed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transport.errors import ErrorCode, PdorchError
from workers.engines.reference.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# The Llama projections an adapter may target, as PEFT names them.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$"
)


@dataclass(frozen=True)
class LoraDelta:
    """One projection's low-rank update: ``x @ a @ b`` is added to ``x @ W``."""

    a: np.ndarray  # [in, r]
    b: np.ndarray  # [r, out], the scale folded in


@dataclass(frozen=True)
class LoraAdapter:
    name: str
    rank: int
    salt: bytes
    layers: tuple[dict[str, LoraDelta], ...]  # per layer: target -> delta (absent: not adapted)


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each adaptable projection."""
    q, kv = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    return {
        "q_proj": (cfg.hidden, q),
        "k_proj": (cfg.hidden, kv),
        "v_proj": (cfg.hidden, kv),
        "o_proj": (q, cfg.hidden),
        "gate_proj": (cfg.hidden, cfg.ffn),
        "up_proj": (cfg.hidden, cfg.ffn),
        "down_proj": (cfg.ffn, cfg.hidden),
    }


def _bad(path: Path, why: str) -> PdorchError:
    return PdorchError(ErrorCode.CONFIG, f"LoRA adapter {path}: {why}")


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise _bad(path, f"cannot read {CONFIG_FILE}: {e}") from None
    if not isinstance(config, dict):
        raise _bad(path, f"{CONFIG_FILE} is not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise _bad(path, f"peft_type {config.get('peft_type')!r} is not LORA")
    for key, neutral in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none")):
        if config.get(key, neutral) not in (neutral, None):
            raise _bad(path, f"{key}={config[key]!r} is not supported")
    if config.get("modules_to_save"):
        raise _bad(path, "modules_to_save (full copies of base modules) is not supported")
    return config


def load_adapter(name: str, path: str | Path, cfg: ModelConfig) -> LoraAdapter:
    """Read a PEFT LoRA directory for a model shaped ``cfg``; a clear CONFIG error if it does not fit."""
    from safetensors.numpy import load_file

    path = Path(path)
    config = _read_config(path)
    try:
        rank = int(config["r"])
        alpha = float(config.get("lora_alpha", rank))
    except (KeyError, TypeError, ValueError) as e:
        raise _bad(path, f"bad or missing r/lora_alpha: {e}") from None
    if rank <= 0:
        raise _bad(path, f"r must be positive, got {rank}")
    scale = alpha / (rank**0.5 if config.get("use_rslora") else rank)
    weights_path = path / WEIGHTS_FILE
    try:
        raw = weights_path.read_bytes()
        tensors = load_file(str(weights_path))
    except (OSError, ValueError) as e:
        raise _bad(path, f"cannot read {WEIGHTS_FILE}: {e}") from None
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise _bad(path, f"unexpected tensor {key!r}")
        layer, target, which = int(match[1]), match[2], match[3]
        if target not in TARGETS:
            raise _bad(path, f"{key}: {target} is not an adaptable projection ({', '.join(TARGETS)})")
        if not 0 <= layer < cfg.layers:
            raise _bad(path, f"{key}: the model has {cfg.layers} layers")
        pairs.setdefault((layer, target), {})[which] = value
    shapes = projection_shapes(cfg)
    layers: list[dict[str, LoraDelta]] = [{} for _ in range(cfg.layers)]
    for (layer, target), ab in sorted(pairs.items()):
        fan_in, fan_out = shapes[target]
        a, b = ab.get("A"), ab.get("B")
        where = f"layer {layer} {target}"
        if a is None or b is None:
            raise _bad(path, f"{where}: lora_A and lora_B must come in pairs")
        if a.shape != (rank, fan_in) or b.shape != (fan_out, rank):
            raise _bad(
                path,
                f"{where}: lora_A {list(a.shape)} / lora_B {list(b.shape)}, expected "
                f"[{rank}, {fan_in}] / [{fan_out}, {rank}]",
            )
        dtype = cfg.np_dtype
        layers[layer][target] = LoraDelta(
            np.ascontiguousarray(a.T, dtype=dtype), np.ascontiguousarray(b.T * scale, dtype=dtype)
        )
    if not pairs:
        raise _bad(path, "no LoRA weights")
    salt = hashlib.blake2b(name.encode() + b"\0" + raw, digest_size=16).digest()
    return LoraAdapter(name, rank, salt, tuple(layers))
