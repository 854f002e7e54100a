"""What a reference worker serves: the random-weight model, a catalogued model, or given weights."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tests.support.tiny_gguf import write_tiny_gguf
from transport.errors import ErrorCode, PdorchError
from transport.security import Security
from workers import main as worker_main
from workers.engines.engine_cli import AgentParts
from workers.engines.reference.model_choice import BYTE_TOKENIZER, choose_model
from workers.models.cache_dir import CACHE_DIR_ENV


@pytest.fixture(autouse=True)
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))


def test_the_random_weight_model_needs_nothing() -> None:
    chosen = choose_model("pdorch-reference", dtype="float32", seed=3, max_model_len=100)
    assert chosen.weights is None and chosen.tokenizer == BYTE_TOKENIZER
    assert (chosen.config.seed, chosen.config.dtype, chosen.config.max_model_len) == (3, "float32", 100)
    assert choose_model("pdorch-reference").config.max_model_len == 2048


def test_given_weights_come_with_their_tokenizer(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf")
    chosen = choose_model("my-model", str(tmp_path / "tiny.gguf"))
    assert chosen.weights is not None and chosen.config.vocab_size == 262
    assert (Path(chosen.tokenizer) / "tokenizer.json").is_file()


def test_a_catalogued_model_must_be_downloaded_first() -> None:
    with pytest.raises(PdorchError) as caught:
        choose_model("smollm2-135m-instruct")
    assert caught.value.code is ErrorCode.CONFIG and "make model" in caught.value.message


def test_an_unknown_name_without_weights_is_refused() -> None:
    with pytest.raises(PdorchError, match="neither a known model"):
        choose_model("my-model")


def test_the_worker_flags_build_the_engine(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf")
    parser = argparse.ArgumentParser()
    worker_main.add_arguments(parser)
    args = parser.parse_args(
        [
            "--model",
            "tiny",
            "--weights",
            str(tmp_path / "tiny.gguf"),
            "--kv-cache-gib",
            "0.5",
            "--block-size",
            "32",
        ]
    )
    info = worker_main._engine_cli("reference").build(args, AgentParts(None, Security.insecure())).info()
    assert (info.model, info.vocab_size, info.eos_token_id) == ("tiny", 262, 2)
    assert (Path(info.tokenizer) / "chat_template.jinja").is_file()
    # 0.5 GiB of float64 KV: 2 layers x K and V x 2 KV heads x 16 dims x 8 bytes per token.
    assert info.kv_bytes_per_token == 2 * 2 * 2 * 16 * 8
    assert info.capacity_blocks == (1 << 29) // (32 * info.kv_bytes_per_token)
