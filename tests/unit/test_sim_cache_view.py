"""The simulator's read-only view of an engine's prefix cache, as placement sees it."""

from __future__ import annotations

import pytest

from simulate.cache_view import CacheView, StaleCacheView
from simulate.fluid import EngineParams, SimEngine
from workers.engines.sim.cost import CostModel

HASHES = (11, 12, 13, 14)


def cached_engine() -> SimEngine:
    e = SimEngine(CostModel("h100", 4), EngineParams(prefix_block_tokens=512))
    e.submit_prefill(0.0, 1, 2048, HASHES, decode_here=False, output_len=2)
    e.advance(10.0)  # prefill done: its blocks are cached
    return e


def test_the_view_shows_the_cache_at_its_instant() -> None:
    e = cached_engine()
    view = CacheView(e)
    assert set(view) == set(e.cache) == set(HASHES)
    assert 12 in view and 99 not in view and len(view) == 4
    assert not hasattr(view, "add") and not hasattr(view, "move_to_end")


def test_a_view_read_after_its_engine_changed_raises_instead_of_showing_newer_contents() -> None:
    e = cached_engine()
    view = CacheView(e)
    e.submit_prefill(20.0, 2, 1024, (21, 22), decode_here=False, output_len=2)
    e.advance(30.0)
    with pytest.raises(StaleCacheView):
        _ = 21 in view
    with pytest.raises(StaleCacheView):
        len(view)
    assert 21 in CacheView(e)  # a fresh view sees the new blocks
