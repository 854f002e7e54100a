"""A request that ends at its first token (EOS from the prefill worker) finishes, whatever order the
two sides' messages arrive in.

The prefill worker stops its KV stream when its token ends the request, so the decode worker
reports "sender aborted: prefill stopped", possibly before the prefill's token reaches the
scheduler on another connection. That must not fail the request (it once did: kv_truncated), nor
even cost it a second attempt.
"""

from __future__ import annotations

import aiohttp
import pytest

from tests.e2e.helpers import gather_limited, generate, metric
from transport.messages import SamplingParams
from workers.engines.reference.config import ModelConfig
from workers.engines.reference.core import EngineCore

pytestmark = pytest.mark.e2e

REPEATS = 12


def _eos_first_prompts() -> list[list[int]]:
    """Two-token prompts whose greedy first token is EOS on the workers' model (found here, fast)."""
    cfg = ModelConfig()
    core = EngineCore(cfg, num_blocks=1024)
    prompts = {f"p{a}": [a, 213] for a in range(256)}
    for rid, prompt in prompts.items():
        core.add_prefill(rid, prompt, SamplingParams(max_tokens=16))
    found = []
    while core.has_work():
        found += [prompts[o.request_id] for o in core.step() if o.token_id == cfg.eos_token_id]
    assert len(found) >= 8, "the model has too few EOS-first prompts for this test"
    return found


@pytest.mark.parametrize("mode", ["p2p", "centralized"])
async def test_eos_at_the_first_token_always_finishes(mode: str, request: pytest.FixtureRequest) -> None:
    cluster = request.getfixturevalue(mode)
    prompts = _eos_first_prompts()
    bodies = [
        {"prompt": p, "max_tokens": 16, "temperature": 0.0, "stream": i % 2 == 0}
        for i, p in enumerate(prompts * REPEATS)
    ]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        before = await metric(s, cluster.url, "pdorch_migrations_total")
        results = await gather_limited([generate(s, cluster.url, b) for b in bodies], limit=8)
        assert await metric(s, cluster.url, "pdorch_migrations_total") == before
    assert all(r == ([ModelConfig().eos_token_id], "stop") for r in results), [
        r for r in results if r != ([ModelConfig().eos_token_id], "stop")
    ][:5]
