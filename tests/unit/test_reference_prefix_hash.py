"""Chained prefix-block hashes: equal prefixes share keys, one changed token changes the rest."""

from __future__ import annotations

import hashlib
import importlib

import numpy as np
import pytest

from transport.errors import ErrorCode, PdorchError
from transport.prefix_hash import prefix_block_hashes

BLOCK = 4


def _tokens(length: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 256, length).tolist()


@pytest.mark.parametrize(
    ("length", "expected_blocks"), [(0, 0), (1, 0), (3, 0), (4, 1), (7, 1), (8, 2), (33, 8)]
)
def test_only_full_blocks_get_a_hash(length: int, expected_blocks: int) -> None:
    assert len(prefix_block_hashes(_tokens(length), BLOCK)) == expected_blocks


def test_same_prefix_gives_the_same_leading_hashes() -> None:
    shared = _tokens(12, seed=1)
    a = prefix_block_hashes(shared + _tokens(9, seed=2), BLOCK)
    b = prefix_block_hashes(shared + _tokens(9, seed=3), BLOCK)
    assert a[:3] == b[:3]
    assert a[3] != b[3] and a[4] != b[4]


@pytest.mark.parametrize("changed", [0, 3, 4, 9, 15])
def test_one_changed_token_changes_its_block_and_every_later_one(changed: int) -> None:
    tokens = _tokens(16, seed=4)
    altered = list(tokens)
    altered[changed] = (altered[changed] + 1) % 256
    before, after = prefix_block_hashes(tokens, BLOCK), prefix_block_hashes(altered, BLOCK)
    first_changed = changed // BLOCK
    assert before[:first_changed] == after[:first_changed]
    assert all(x != y for x, y in zip(before[first_changed:], after[first_changed:], strict=True))


def test_the_hash_is_chained_not_per_block() -> None:
    # The same block contents after different prefixes must not share a key.
    block = [7, 7, 7, 7]
    a = prefix_block_hashes([1, 2, 3, 4, *block], BLOCK)
    b = prefix_block_hashes([5, 6, 7, 8, *block], BLOCK)
    assert a[1] != b[1]
    assert len(set(prefix_block_hashes(block * 3, BLOCK))) == 3


def test_hashes_are_stable_63_bit_values_across_processes_and_input_types() -> None:
    # Pinned: any change to the scheme invalidates keys a scheduler may have computed.
    expected = [8479124504904169328, 8460841841493960610]
    assert prefix_block_hashes(list(range(8)), BLOCK) == expected
    assert prefix_block_hashes(np.arange(8, dtype=np.int32), BLOCK) == expected
    assert prefix_block_hashes(np.arange(9, dtype=np.intp), BLOCK) == expected
    assert all(0 <= h < 2**63 for h in prefix_block_hashes(_tokens(400, seed=5), 16))
    # Salted, and ids at the ends of the int64 range.
    assert prefix_block_hashes(list(range(40)), 8, b"lora:x")[::2] == [
        4295037301209107870,
        2017951264193321928,
        7633374028429196808,
    ]
    assert prefix_block_hashes([2**63 - 1, -5, 0, 7, 1], 2) == [934221254049285236, 3726585288341729087]


@pytest.mark.parametrize("length", [0, 15, 16, 17, 1000, 8193])
def test_a_long_prompt_hashes_as_the_block_by_block_definition_says(length: int) -> None:
    tokens = np.random.default_rng(length).integers(0, 2**40, length).tolist()
    parent, want = b"", []
    for start in range(0, length - 15, 16):
        parent = hashlib.blake2b(
            parent + np.asarray(tokens[start : start + 16], "<i8").tobytes(), digest_size=8
        ).digest()
        want.append(int.from_bytes(parent, "little") >> 1)
    assert prefix_block_hashes(tokens, 16) == want
    assert prefix_block_hashes(np.asarray(tokens, dtype=np.int64), 16) == want


def test_the_scheduler_computes_the_same_keys() -> None:
    try:
        prompt_block_hashes = importlib.import_module("scheduler.placement.prefix").prompt_block_hashes
    except (ImportError, AttributeError):
        pytest.skip("the scheduler's prompt_block_hashes is not in this tree")
    for length, block_size in [(0, 16), (50, 16), (64, 16), (37, 4), (300, 8)]:
        tokens = _tokens(length, seed=length)
        assert prefix_block_hashes(tokens, block_size) == list(prompt_block_hashes(tokens, block_size))


def test_block_size_must_be_positive() -> None:
    with pytest.raises(PdorchError) as caught:
        prefix_block_hashes([1, 2], 0)
    assert caught.value.code is ErrorCode.INTERNAL
