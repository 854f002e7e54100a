"""The reference engine's core on the default model's real weights: chunked prefill, the prefix
cache and continuous batching give a request the same tokens as computing it alone in one piece,
greedy and seeded (the random-weight model's unit tests show the same on every path)."""

from __future__ import annotations

import pytest

from scheduler.tokenizer.hf import HfTokenizer
from tests.support.real_model import default_model_dir
from transport.messages import SamplingParams
from workers.engines.reference.checkpoint import load_checkpoint
from workers.engines.reference.core import EngineCore
from workers.engines.reference.weights import ModelWeights

STORY = "Once upon a time, there was a little girl who lived by a river. Every morning she"
CHATS = [
    [("user", "What is the capital of France?")],
    [("user", "Write one sentence about the sea.")],
    [("system", "You are a concise assistant."), ("user", "Name three colors.")],
]


@pytest.fixture(scope="module")
def model() -> tuple:
    directory = default_model_dir()
    cfg, weights = load_checkpoint(directory, max_model_len=1024)
    return cfg, weights, HfTokenizer(directory)


def _run(
    core: EngineCore,
    requests: dict[str, tuple[list[int], SamplingParams]],
    cached: dict[str, int] | None = None,
) -> dict[str, list[int]]:
    """Every request's tokens; ``cached`` gets how many prompt tokens each took from the cache."""
    for rid, (prompt, sampling) in requests.items():
        core.add_generate(rid, prompt, sampling)
    out: dict[str, list[int]] = {rid: [] for rid in requests}
    done = 0
    while done < len(requests):
        for step in core.step():
            assert not step.failed, step.message
            if not out[step.request_id] and cached is not None:
                cached[step.request_id] = step.cached_tokens
            out[step.request_id].append(step.token_id)
            done += step.finish_reason is not None
    return out


def _core(cfg, weights: ModelWeights, **options: object) -> EngineCore:  # type: ignore[no-untyped-def]
    return EngineCore(cfg, 256, 16, weights=weights, **options)  # type: ignore[arg-type]


def test_chunks_cache_and_batching_do_not_change_tokens(model: tuple) -> None:
    cfg, weights, tok = model
    greedy, seeded = SamplingParams(max_tokens=12), SamplingParams(max_tokens=12, temperature=0.8, seed=5)
    prompts = [tok.apply_chat_template(c) for c in CHATS] + [tok.encode(STORY)]
    requests = {
        f"r{i}-{kind}": (p, s) for i, p in enumerate(prompts) for kind, s in (("g", greedy), ("s", seeded))
    }
    # Each alone, in one piece, no cache.
    alone = {}
    for rid, request in requests.items():
        alone |= _run(_core(cfg, weights, enable_prefix_caching=False), {rid: request})
    # All at once, prompts cut into 16-token chunks, the chats' shared system prompt cached.
    core = _core(cfg, weights, max_prefill_tokens_per_step=16)
    _run(core, {"warm": (prompts[0], greedy)})  # fills the cache with the default system prompt
    cached: dict[str, int] = {}
    together = _run(core, requests, cached)
    assert together == alone
    # The paths were taken: the warmed prompt came from the cache whole (all but its last block is
    # reusable), the other chats shared its system prompt.
    assert cached["r0-g"] == (len(prompts[0]) - 1) // 16 * 16 and cached["r1-g"] >= 16, cached
    assert tok.decode(alone["r0-g"]).startswith("The capital of France is Paris")
