"""64 concurrent streaming requests through a real disaggregated cluster all get the right tokens."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.e2e.helpers import complete, stream_tokens

pytestmark = pytest.mark.e2e


async def test_64_concurrent_streams(p2p, colocated) -> None:
    bodies = [
        {
            "prompt": f"request number {i}: " + "x" * (i * 3),
            "max_tokens": 8 + i % 17,
            "temperature": 0.8,
            "seed": i,
        }
        for i in range(64)
    ]
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=100)) as s:
        streamed = await asyncio.gather(*(stream_tokens(s, p2p.url, **b) for b in bodies))
        # The right tokens: what a colocated worker produces for the same request, one at a time.
        expected = [await complete(s, colocated.url, **b) for b in bodies]
    for i, ((ids, finish, _), want) in enumerate(zip(streamed, expected, strict=True)):
        assert ids == want["choices"][0]["token_ids"], f"request {i}"
        assert finish == want["choices"][0]["finish_reason"], f"request {i}"
