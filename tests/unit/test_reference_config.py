"""The reference model's config: derived sizes and validation."""

from __future__ import annotations

import pytest

from transport.errors import ErrorCode, PdorchError
from workers.engines.reference.config import ModelConfig


def test_defaults_describe_the_byte_level_model() -> None:
    cfg = ModelConfig()
    assert (cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id) == (260, 256, 257)
    assert cfg.kv_row_shape == (2, 2, 32)
    # layers * (K and V) * kv_heads * head_dim * 8 bytes (float64)
    assert cfg.kv_bytes_per_token == 4 * 2 * 2 * 32 * 8


def test_kv_bytes_follow_dtype() -> None:
    assert ModelConfig(dtype="float32").kv_bytes_per_token == ModelConfig().kv_bytes_per_token // 2


def test_config_is_frozen() -> None:
    cfg = ModelConfig()
    with pytest.raises(AttributeError):
        cfg.hidden = 64  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "mentions"),
    [
        ({"heads": 4, "kv_heads": 3}, "multiple of kv_heads"),
        ({"head_dim": 31}, "even"),
        ({"hidden": 0}, "hidden"),
        ({"layers": -1}, "layers"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"ffn": 0}, "ffn"),
        ({"dtype": "float16"}, "dtype"),
        ({"eos_token_id": 260}, "eos_token_id"),
        ({"bos_token_id": -1}, "bos_token_id"),
        ({"rope_theta": 1.0}, "rope_theta"),
        ({"seed": -5}, "seed"),
    ],
)
def test_invalid_config_is_a_clear_config_error(overrides: dict[str, object], mentions: str) -> None:
    with pytest.raises(PdorchError) as caught:
        ModelConfig(**overrides)  # type: ignore[arg-type]
    assert caught.value.code is ErrorCode.CONFIG
    assert mentions in caught.value.message
