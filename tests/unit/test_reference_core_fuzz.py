"""Seeded random operation sequences against the engine core, with prefix caching and chunking on.

After every operation the block accounting must be exact (every reference belongs to a live
request or reservation; used + free + cached == total), and every request that finished must have
produced exactly the tokens it produces alone on a core without cache or chunks.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from transport.errors import ErrorCode, PdorchError
from transport.messages import SamplingParams
from workers.engines.reference.config import ModelConfig
from workers.engines.reference.core import EngineCore
from workers.engines.reference.kv_cache import PagedKvCache
from workers.engines.reference.model import ReferenceModel
from workers.engines.reference.step_output import StepOutput

TINY = ModelConfig(hidden=32, layers=2, heads=2, kv_heads=1, head_dim=16, ffn=64, max_model_len=96)
BLOCK = 4
OPERATIONS = 150
Request = tuple[tuple[int, ...], int, float]  # prompt, max_tokens, temperature (seed fixed per test)


class _Reference:
    """Tokens of a request run alone, without prefix cache or chunking (memoized)."""

    def __init__(self) -> None:
        self._known: dict[Request, list[int]] = {}
        self.model = ReferenceModel(TINY)

    def tokens(self, prompt: list[int], sampling: SamplingParams) -> list[int]:
        key = (tuple(prompt), sampling.max_tokens, sampling.temperature)
        if key not in self._known:
            core = EngineCore(TINY, num_blocks=64, block_size=BLOCK, enable_prefix_caching=False)
            core.add_generate("r", prompt, sampling)
            tokens: list[int] = []
            while core.has_work():
                tokens += [o.token_id for o in core.step()]
            self._known[key] = tokens
        return self._known[key]

    def prompt_kv(self, prompt: list[int]) -> dict[int, np.ndarray]:
        cache = PagedKvCache(TINY, 64, BLOCK)
        kv: dict[int, np.ndarray] = {}
        self.model.prefill(prompt, cache, list(range(cache.blocks_for(len(prompt)))), kv.__setitem__)
        return kv


def _check_accounting(core: EngineCore) -> None:
    core.check_block_accounting()
    load = core.load()
    assert load.blocks_used == core.allocator.num_used
    assert load.blocks_used + core.allocator.num_free + load.cached_blocks == load.blocks_total


@pytest.mark.parametrize("seed", range(3))
def test_random_operations_keep_exact_accounting_and_tokens(seed: int) -> None:
    rng = random.Random(seed)
    reference = _Reference()
    core = EngineCore(
        TINY,
        num_blocks=24,
        block_size=BLOCK,
        max_batch=4,
        max_prefill_tokens_per_step=rng.choice([5, 12, 40]),
    )
    stems = [[rng.randrange(256) for _ in range(24)] for _ in range(3)]  # shared prefixes
    requests: dict[str, tuple[list[int], SamplingParams]] = {}
    handed_off_first: dict[str, int] = {}
    outputs: dict[str, list[StepOutput]] = {}
    cancelled: set[str] = set()
    cached_before: frozenset[int] = frozenset()
    evicted: set[int] = set()  # prefix hashes that were cached once and then evicted

    def new_request() -> tuple[str, list[int], SamplingParams]:
        rid = f"r{len(requests)}"
        prompt = rng.choice(stems)[: rng.randint(0, 24)] + [
            rng.randrange(256) for _ in range(rng.randint(1, 10))
        ]
        temperature = rng.choice([0.0, 0.9])
        sampling = SamplingParams(
            max_tokens=rng.randint(2, 8), temperature=temperature, seed=seed, ignore_eos=True
        )
        requests[rid] = (prompt, sampling)
        return rid, prompt, sampling

    for _ in range(OPERATIONS):
        op = rng.random()
        if op < 0.25:
            rid, prompt, sampling = new_request()
            core.add_generate(rid, prompt, sampling)
        elif op < 0.35:
            rid, prompt, sampling = new_request()

            def whole_prompt(layer: int, rows: np.ndarray, n: int = len(prompt)) -> None:
                assert rows.shape == (n, *TINY.kv_row_shape)

            core.add_prefill(rid, prompt, sampling, on_layer=whole_prompt)
        elif op < 0.45:
            rid, prompt, sampling = new_request()
            try:
                blocks = core.reserve_decode(rid, len(prompt))
            except PdorchError as err:
                assert err.code is ErrorCode.OUT_OF_BLOCKS
                del requests[rid]
                continue
            for layer, rows in reference.prompt_kv(prompt).items():
                core.cache.scatter(layer, blocks, 0, rows)
            handed_off_first[rid] = reference.tokens(prompt, sampling)[0]
            given = prompt if rng.random() < 0.7 else None
            core.add_decode(rid, len(prompt), handed_off_first[rid], sampling, prompt_token_ids=given)
        elif op < 0.55 and requests:
            rid = rng.choice(sorted(requests))
            core.cancel(rid)
            cancelled.add(rid)
        else:
            for out in core.step():
                outputs.setdefault(out.request_id, []).append(out)
        _check_accounting(core)
        now_cached = core.cached_block_hashes()
        evicted |= cached_before - now_cached
        cached_before = now_cached

    for _ in range(1000):
        if not core.has_work():
            break
        for out in core.step():
            outputs.setdefault(out.request_id, []).append(out)
        _check_accounting(core)
    assert not core.has_work()
    assert core.load().blocks_used == 0

    compared = 0
    for rid, (prompt, sampling) in requests.items():
        outs = outputs.get(rid, [])
        if rid in cancelled or not outs or outs[-1].failed:
            assert rid in cancelled or (outs and outs[-1].error is ErrorCode.OUT_OF_BLOCKS), (rid, outs)
            continue
        got = [handed_off_first[rid]] if rid in handed_off_first else []
        got += [o.token_id for o in outs]
        expected = reference.tokens(prompt, sampling)
        assert got == expected[: len(got)], rid
        assert len(got) in (1, len(expected))  # a prefill-only request stops after token 0
        compared += 1
    assert compared >= 10
    assert any(o.cached_tokens > 0 for outs in outputs.values() for o in outs)  # the cache was hit
    assert evicted  # and under pressure
