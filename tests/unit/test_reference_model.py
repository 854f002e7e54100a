"""The reference transformer: KV-cached decoding must equal full recomputation."""

from __future__ import annotations

import numpy as np
import pytest

from transport.errors import ErrorCode, PdorchError
from workers.engines.reference.config import ModelConfig
from workers.engines.reference.kv_cache import BlockAllocator, PagedKvCache
from workers.engines.reference.model import ReferenceModel

CFG = ModelConfig()
DECODE_STEPS = 50


@pytest.fixture(scope="module")
def model() -> ReferenceModel:
    return ReferenceModel(CFG)


def _prompt(length: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 256, length).tolist()


def _greedy_cached(
    model: ReferenceModel, prompt: list[int], steps: int, block_size: int
) -> tuple[list[int], np.ndarray]:
    """Greedy decoding through prefill + decode_step; returns (tokens, logits per step)."""
    cache = PagedKvCache(CFG, 64, block_size)
    blocks = BlockAllocator(64).allocate(cache.blocks_for(len(prompt) + steps))
    logits = [model.prefill(prompt, cache, blocks)]
    tokens: list[int] = []
    for _ in range(steps):
        tokens.append(int(np.argmax(logits[-1])))
        position = len(prompt) + len(tokens) - 1
        logits.append(model.decode_step([(tokens[-1], position, blocks)], cache)[0])
    return tokens, np.array(logits[:-1])


@pytest.mark.parametrize("prompt_len", [1, 2, 15, 16, 17, 40, 130])
def test_cached_decoding_equals_full_recompute(model: ReferenceModel, prompt_len: int) -> None:
    prompt = _prompt(prompt_len, seed=prompt_len)
    tokens, cached_logits = _greedy_cached(model, prompt, DECODE_STEPS, block_size=16)
    full = model.forward_full(prompt + tokens)
    # Row p of the full pass predicts token p + 1: the same thing each cached step predicted.
    np.testing.assert_allclose(cached_logits, full[prompt_len - 1 : -1], rtol=0, atol=1e-9)
    assert tokens == [int(t) for t in np.argmax(full[prompt_len - 1 : -1], axis=-1)]


@pytest.mark.parametrize("block_size", [1, 5, 16, 64])
def test_block_size_does_not_change_results(model: ReferenceModel, block_size: int) -> None:
    prompt = _prompt(23, seed=3)
    tokens, logits = _greedy_cached(model, prompt, 20, block_size)
    reference_tokens, reference_logits = _greedy_cached(model, prompt, 20, 16)
    assert tokens == reference_tokens
    np.testing.assert_allclose(logits, reference_logits, rtol=0, atol=1e-12)


def test_batched_decode_equals_one_by_one(model: ReferenceModel) -> None:
    # Short contexts take the padded batched path, contexts over 256 tokens the per-sequence one.
    lengths = [1, 3, 16, 17, 33, 64, 100, 257, 300, 5, 2, 280]
    cache = PagedKvCache(CFG, 512, 16)
    alloc = BlockAllocator(512)
    sequences = []
    for i, length in enumerate(lengths):
        prompt = _prompt(length, seed=100 + i)
        blocks = alloc.allocate(cache.blocks_for(length + 8))
        first = int(np.argmax(model.prefill(prompt, cache, blocks)))
        sequences.append((prompt, blocks, [first]))
    for _ in range(8):
        batch = [(gen[-1], len(p) + len(gen) - 1, blocks) for p, blocks, gen in sequences]
        logits = model.decode_step(batch, cache)
        for (prompt, _, gen), row in zip(sequences, logits, strict=True):
            full = model.forward_full(prompt + gen)[-1]
            np.testing.assert_allclose(row, full, rtol=0, atol=1e-9)
            gen.append(int(np.argmax(row)))


def test_decode_ignores_blocks_reserved_beyond_the_position(model: ReferenceModel) -> None:
    prompt = _prompt(10, seed=9)
    cache = PagedKvCache(CFG, 16, 4)
    blocks = BlockAllocator(16).allocate(12)  # far more than the 11 tokens need
    # Blocks reserved ahead are never read: even NaN there (which scatter would refuse) is harmless.
    cache.layer_array(0)[blocks[5:]] = np.nan
    first = int(np.argmax(model.prefill(prompt, cache, blocks)))
    row = model.decode_step([(first, 10, blocks)], cache)[0]
    np.testing.assert_allclose(row, model.forward_full([*prompt, first])[-1], rtol=0, atol=1e-9)


def test_on_layer_receives_each_layers_kv_in_order(model: ReferenceModel) -> None:
    prompt = _prompt(37, seed=4)
    cache = PagedKvCache(CFG, 8, 16)
    blocks = [5, 1, 6]
    seen: list[tuple[int, np.ndarray]] = []
    model.prefill(prompt, cache, blocks, on_layer=lambda layer, rows: seen.append((layer, rows)))
    assert [layer for layer, _ in seen] == list(range(CFG.layers))
    for layer, rows in seen:
        assert rows.shape == (37, *CFG.kv_row_shape)
        assert rows.flags.c_contiguous
        np.testing.assert_array_equal(rows, cache.gather(layer, blocks, 37))
    kept = [rows.copy() for _, rows in seen]
    cache.layer_array(0)[:] = 0  # the callee's arrays must not alias the cache
    for (_, rows), copy in zip(seen, kept, strict=True):
        np.testing.assert_array_equal(rows, copy)


def test_kv_copied_into_another_cache_continues_identically(model: ReferenceModel) -> None:
    prompt = _prompt(45, seed=5)
    source = PagedKvCache(CFG, 8, 16)
    source_blocks = [3, 0, 7]
    first = int(np.argmax(model.prefill(prompt, source, source_blocks)))
    target = PagedKvCache(CFG, 32, 4)
    target_blocks = [30, 2, 17, 9, 11, 4, 25, 8, 13, 20, 1, 6]
    for layer in range(CFG.layers):
        target.scatter(layer, target_blocks, 0, source.gather(layer, source_blocks, 45))
    here = model.decode_step([(first, 45, source_blocks)], source)[0]
    there = model.decode_step([(first, 45, target_blocks)], target)[0]
    np.testing.assert_allclose(there, here, rtol=0, atol=1e-12)


def test_weights_are_seeded_and_activations_stay_order_one() -> None:
    prompt = _prompt(12, seed=6)
    a = ReferenceModel(CFG).forward_full(prompt)
    np.testing.assert_array_equal(a, ReferenceModel(CFG).forward_full(prompt))
    b = ReferenceModel(ModelConfig(seed=1)).forward_full(prompt)
    assert not np.allclose(a, b)
    assert np.isfinite(a).all()
    assert 0.3 < a.std() < 5.0
    # Not degenerate: different positions prefer different tokens.
    assert len(set(np.argmax(a, axis=-1).tolist())) > 3


def test_float32_model_runs() -> None:
    cfg = ModelConfig(dtype="float32", layers=2)
    model = ReferenceModel(cfg)
    cache = PagedKvCache(cfg, 4, 16)
    prompt = _prompt(20)
    logits = model.prefill(prompt, cache, [0, 1])
    assert logits.dtype == np.float32
    first = int(np.argmax(logits))
    step = model.decode_step([(first, 20, [0, 1])], cache)[0]
    assert step.dtype == np.float32
    np.testing.assert_allclose(step, model.forward_full([*prompt, first])[-1], rtol=0, atol=1e-3)


@pytest.mark.parametrize(
    ("prompt", "code"),
    [
        ([], ErrorCode.INVALID_REQUEST),
        ([1] * (CFG.max_model_len + 1), ErrorCode.PROMPT_TOO_LONG),
        ([1, 260], ErrorCode.INVALID_REQUEST),
        ([-1], ErrorCode.INVALID_REQUEST),
    ],
)
def test_bad_prompts_are_refused(model: ReferenceModel, prompt: list[int], code: ErrorCode) -> None:
    with pytest.raises(PdorchError) as caught:
        model.forward_full(prompt)
    assert caught.value.code is code


def test_decode_refuses_a_table_too_short_for_the_position(model: ReferenceModel) -> None:
    cache = PagedKvCache(CFG, 4, 4)
    with pytest.raises(PdorchError) as caught:
        model.decode_step([(1, 8, [0, 1])], cache)
    assert caught.value.code is ErrorCode.INTERNAL
    assert model.decode_step([], cache).shape == (0, CFG.vocab_size)
