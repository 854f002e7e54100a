"""The compiled checked copy: the same digests as xxhash, the same bytes as a copy."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash

kernel = pytest.importorskip("transport.kv._copy_checksum")


@pytest.mark.parametrize("n", [*range(0, 2200), 4095, 4096, 4097, 65537, 524289, 2 * 1048576 + 13])
def test_digest_and_copy_match_xxhash_and_memcpy(n: int) -> None:
    src = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    dst = np.zeros(n, np.uint8)
    assert kernel.copy_checksums(src, [dst], max(1, n)) == ([xxhash.xxh3_64_intdigest(src)] if n else [])
    assert np.array_equal(src, dst)


def test_spans_and_pieces() -> None:
    src = np.random.default_rng(0).integers(0, 256, 3_000_001, dtype=np.uint8)
    a, b = np.zeros(1_000_000, np.uint8), np.zeros(1_500_001, np.uint8)
    got = kernel.copy_checksums(src, [a, 500_000, b], 65536)
    assert got == [xxhash.xxh3_64_intdigest(src[o : o + 65536]) for o in range(0, len(src), 65536)]
    assert np.array_equal(a, src[:1_000_000]) and np.array_equal(b, src[1_500_000:])
