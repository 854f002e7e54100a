"""Disaggregated output equals colocated output, token for token, in both KV modes (p2p through
shared memory and through TCP).

The main correctness check of pdorch: the KV computed by a prefill worker, handed to a decode
worker over the KV plane (directly, or through the broker), must continue exactly as if one worker
had done everything. Real processes, started like `pdorch up` starts them.
"""

from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest

from tests.e2e.helpers import complete, gather_limited

pytestmark = pytest.mark.e2e


def _cases() -> list[dict]:
    rng = random.Random(7)
    lengths = [
        1,
        2,
        3,
        5,
        8,
        15,
        16,
        17,
        31,
        33,
        64,
        90,
        127,
        128,
        129,
        200,
        256,
        300,
        350,
        420,
        480,
        10,
        45,
        77,
    ]
    max_tokens = [1, 2, 7, 16, 40]
    cases = []
    for i, n in enumerate(lengths):
        prompt = [rng.randrange(0, 256) for _ in range(n)]
        case: dict = {"prompt": prompt, "max_tokens": max_tokens[i % len(max_tokens)]}
        if i % 2:
            case.update(temperature=0.9, top_p=0.9, seed=1000 + i)
        else:
            case.update(temperature=0.0)
        cases.append(case)
    # Text prompts go through the scheduler's tokenizer; stop strings are cut the same way in every mode.
    cases.append(
        {"prompt": "The quick brown fox jumps over the lazy dog. " * 4, "max_tokens": 24, "temperature": 0}
    )
    cases.append({"prompt": "pdorch", "max_tokens": 24, "temperature": 0.7, "seed": 5, "stop": ["zz"]})
    return cases


CASES = _cases()


async def _run_all(url: str) -> list[tuple[list[int], str, str]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
        results = await gather_limited([complete(s, url, **c) for c in CASES], limit=6)
    return [
        (r["choices"][0]["token_ids"], r["choices"][0]["text"], r["choices"][0]["finish_reason"])
        for r in results
    ]


@pytest.fixture(scope="module")
def expected(colocated) -> list[tuple[list[int], str, str]]:
    return asyncio.run(_run_all(colocated.url))


@pytest.mark.parametrize("fixture", ["p2p", "p2p_tcp", "centralized"])
async def test_disaggregated_equals_colocated(fixture: str, expected, request: pytest.FixtureRequest) -> None:
    """p2p hands the KV over through shared memory (both workers are on this host), p2p_tcp over
    the socket, centralized through the broker."""
    cluster = request.getfixturevalue(fixture)
    mode = fixture.removesuffix("_tcp")
    got = await _run_all(cluster.url)
    assert len(got) == len(CASES) >= 20
    for case, want, have in zip(CASES, expected, got, strict=True):
        assert have == want, (
            f"mismatch for prompt of {len(case['prompt'])} tokens, max_tokens={case['max_tokens']}"
        )
    # The lengths really vary and the requests really ran to their limits or EOS.
    assert {len(w[0]) for w in expected} >= {1, 2, 7}
    # Every request was split: the scheduler handed off KV for all but the single-token ones.
    state = cluster.cluster_state()
    assert {w["role"] for w in state["workers"]} == {"prefill", "decode"}
    assert state["kv_mode"] == mode


async def test_same_request_twice_gives_the_same_tokens(p2p) -> None:
    async with aiohttp.ClientSession() as s:
        body = {"prompt": "determinism", "max_tokens": 20, "temperature": 1.0, "seed": 42}
        a = await complete(s, p2p.url, **body)
        b = await complete(s, p2p.url, **body)
        c = await complete(s, p2p.url, **{**body, "seed": 43})
    assert a["choices"][0]["token_ids"] == b["choices"][0]["token_ids"]
    assert a["choices"][0]["token_ids"] != c["choices"][0]["token_ids"]
