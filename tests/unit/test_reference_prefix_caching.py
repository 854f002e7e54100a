"""Prefix caching in the engine core: what hits, what it reports, and that it changes no token."""

from __future__ import annotations

import numpy as np
import pytest

from transport.errors import ErrorCode, PdorchError
from transport.messages import SamplingParams
from transport.prefix_hash import prefix_block_hashes
from workers.engines.reference.config import ModelConfig
from workers.engines.reference.core import EngineCore
from workers.engines.reference.step_output import StepOutput

CFG = ModelConfig()
BLOCK = 16
MAX_STEPS = 2000
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)


def _prompt(length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 256, length).tolist()


BASE = _prompt(50, seed=1)  # 3 full blocks of 16 + 2 tokens


def _step(core: EngineCore, outputs: dict[str, list[StepOutput]]) -> None:
    for out in core.step():
        assert not out.failed, out
        outputs.setdefault(out.request_id, []).append(out)
    core.check_block_accounting()


def _run(core: EngineCore, outputs: dict[str, list[StepOutput]] | None = None) -> dict[str, list[StepOutput]]:
    """Step until idle; every request's outputs in order (added to ``outputs`` if given)."""
    outputs = {} if outputs is None else outputs
    for _ in range(MAX_STEPS):
        if not core.has_work():
            return outputs
        _step(core, outputs)
    raise AssertionError("core did not drain")


def _tokens(outputs: list[StepOutput]) -> list[int]:
    return [o.token_id for o in outputs]


def _generate_uncached(prompt: list[int], sampling: SamplingParams) -> list[int]:
    core = EngineCore(CFG, num_blocks=64, enable_prefix_caching=False)
    core.add_generate("r", prompt, sampling)
    return _tokens(_run(core)["r"])


def _assert_blocks_add_up(core: EngineCore) -> None:
    load = core.load()
    assert load.blocks_used + core.allocator.num_free + load.cached_blocks == load.blocks_total


# --------------------------------------------------------------------------- hits and misses


@pytest.mark.parametrize(
    ("second_prompt", "expected_cached"),
    [
        pytest.param(BASE, 48, id="same-prompt"),
        pytest.param(BASE + _prompt(30, seed=2), 48, id="longer-prompt"),
        pytest.param(BASE[:40] + _prompt(20, seed=3), 32, id="partial-hit"),
        pytest.param(BASE[:20] + _prompt(5, seed=4), 16, id="one-block"),
        pytest.param(BASE[:48], 32, id="all-blocks-cached-recomputes-the-last"),
        pytest.param(BASE[:16], 0, id="one-cached-block-is-all-of-it"),
        pytest.param(BASE[:15], 0, id="shorter-than-a-block"),
        pytest.param([(BASE[0] + 1) % 256, *BASE[1:]], 0, id="first-token-differs"),
        pytest.param(_prompt(50, seed=9), 0, id="unrelated"),
    ],
)
@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_later_prompt_reuses_the_cached_prefix_and_gets_the_same_tokens(
    second_prompt: list[int], expected_cached: int, sampling: SamplingParams
) -> None:
    core = EngineCore(CFG, num_blocks=64)
    core.add_generate("first", BASE, sampling)
    first = _run(core)["first"]
    assert first[0].cached_tokens == 0
    core.add_generate("second", second_prompt, sampling)
    second = _run(core)["second"]
    assert second[0].cached_tokens == expected_cached
    assert all(o.cached_tokens == 0 for o in second[1:])  # reported once, on token 0
    assert _tokens(second) == _generate_uncached(second_prompt, sampling)
    assert _tokens(first) == _generate_uncached(BASE, sampling)


def test_caching_off_reports_no_hits_and_keeps_nothing() -> None:
    core = EngineCore(CFG, num_blocks=64, enable_prefix_caching=False)
    for rid in ("a", "b"):
        core.add_generate(rid, BASE, GREEDY)
        assert _run(core)[rid][0].cached_tokens == 0
    assert core.load().cached_blocks == 0
    assert core.cached_block_hashes() == frozenset()


def test_prompts_in_the_same_step_share_what_the_earlier_one_computed() -> None:
    core = EngineCore(CFG, num_blocks=64)
    core.add_prefill("a", BASE, GREEDY)
    core.add_prefill("b", BASE, GREEDY)
    outputs = {o.request_id: o for o in core.step()}
    assert (outputs["a"].cached_tokens, outputs["b"].cached_tokens) == (0, 48)
    assert outputs["a"].token_id == outputs["b"].token_id


def test_a_running_sequence_shares_its_prompt_blocks() -> None:
    core = EngineCore(CFG, num_blocks=64)
    outputs: dict[str, list[StepOutput]] = {}
    core.add_generate("long", BASE, SamplingParams(max_tokens=40, ignore_eos=True))
    _step(core, outputs)
    core.add_generate("other", [*BASE[:33], 7], GREEDY)
    _step(core, outputs)
    assert core.load().blocks_used == 4 + 1  # "long": 4 blocks; "other": 2 of those + 1 of its own
    _run(core, outputs)
    assert outputs["other"][0].cached_tokens == 32
    assert _tokens(outputs["other"]) == _generate_uncached([*BASE[:33], 7], GREEDY)


# --------------------------------------------------------------------------- what stays cached


def test_finished_and_cancelled_requests_leave_their_full_prompt_blocks_cached() -> None:
    core = EngineCore(CFG, num_blocks=64)
    core.add_generate("done", BASE, GREEDY)
    _run(core)
    assert core.load().blocks_used == 0
    assert core.load().cached_blocks == 3  # the partial 4th block (prompt tail + output) is freed
    assert core.cached_block_hashes() == frozenset(prefix_block_hashes(BASE, BLOCK))
    _assert_blocks_add_up(core)

    other = _prompt(40, seed=5)
    core.add_generate("cancelled", other, SamplingParams(max_tokens=100, ignore_eos=True))
    core.step()
    core.cancel("cancelled")
    core.step()
    assert core.load().blocks_used == 0 and core.load().cached_blocks == 5
    assert core.cached_block_hashes() >= frozenset(prefix_block_hashes(other, BLOCK))
    _assert_blocks_add_up(core)


def test_prefill_only_requests_leave_their_prefix_cached() -> None:
    core = EngineCore(CFG, num_blocks=64)
    core.add_prefill("p", BASE, GREEDY)
    core.step()
    assert (core.load().blocks_used, core.load().cached_blocks) == (0, 3)


# --------------------------------------------------------------------------- eviction


def test_allocation_evicts_the_least_recently_finished_prefix_first() -> None:
    # 8 blocks of 4 tokens: two finished 12-token prompts cache 3 blocks each (2 blocks stay free).
    core = EngineCore(CFG, num_blocks=8, block_size=4)
    older, newer = _prompt(12, seed=6), _prompt(12, seed=7)
    for rid, prompt in (("older", older), ("newer", newer)):
        core.add_prefill(rid, prompt, GREEDY)
        _run(core)
    assert core.load().cached_blocks == 6
    core.reserve_decode("d", 15)  # 4 blocks: 2 free + the older prompt's last 2 blocks
    assert core.cached_block_hashes() == frozenset(
        prefix_block_hashes(older, 4)[:1] + prefix_block_hashes(newer, 4)
    )
    _assert_blocks_add_up(core)
    core.cancel("d")
    core.add_generate("again", newer, GREEDY)  # the newer prefix is still there
    assert _run(core)["again"][0].cached_tokens == 8


def test_blocks_a_request_holds_are_never_evicted() -> None:
    core = EngineCore(CFG, num_blocks=8, block_size=4)
    prompt = _prompt(12, seed=8)
    core.add_prefill("warm", prompt, GREEDY)
    _run(core)
    three = SamplingParams(max_tokens=3, ignore_eos=True)  # never needs a 5th block
    core.add_generate("holder", [*prompt, 1], three)
    outputs: dict[str, list[StepOutput]] = {}
    _step(core, outputs)  # "holder" shares the 3 cached blocks and owns 1 more
    assert core.load().blocks_used == 4
    with pytest.raises(PdorchError) as caught:
        core.reserve_decode("d", 20)  # 6 blocks, only 4 can be had
    assert caught.value.code is ErrorCode.OUT_OF_BLOCKS
    core.reserve_decode("d", 12)  # 4 blocks: every free one, nothing "holder" holds
    assert core.cached_block_hashes() == frozenset(prefix_block_hashes(prompt, 4))
    assert _tokens(_run(core, outputs)["holder"]) == _generate_uncached([*prompt, 1], three)


# --------------------------------------------------------------------------- handed-off KV


def _hand_off(prompt: list[int], sampling: SamplingParams) -> tuple[int, dict[int, np.ndarray]]:
    prefill = EngineCore(CFG, num_blocks=64)
    kv: dict[int, np.ndarray] = {}
    prefill.add_prefill("r", prompt, sampling, on_layer=kv.__setitem__)
    (first,) = prefill.step()
    return first.token_id, kv


@pytest.mark.parametrize(("register", "expected_cached"), [(True, 48), (False, 0)])
def test_handed_off_blocks_join_the_cache_when_the_prompt_is_given(
    register: bool, expected_cached: int
) -> None:
    first, kv = _hand_off(BASE, GREEDY)
    decode = EngineCore(CFG, num_blocks=64)
    blocks = decode.reserve_decode("r", len(BASE))
    for layer, rows in kv.items():
        decode.cache.scatter(layer, blocks, 0, rows)
    decode.add_decode("r", len(BASE), first, GREEDY, prompt_token_ids=BASE if register else None)
    handed_off = [first, *_tokens(_run(decode)["r"])]
    assert handed_off == _generate_uncached(BASE, GREEDY)
    assert decode.load().cached_blocks == (3 if register else 0)
    later = [*BASE, 5, 6]
    decode.add_generate("later", later, GREEDY)
    outputs = _run(decode)["later"]
    assert outputs[0].cached_tokens == expected_cached
    assert _tokens(outputs) == _generate_uncached(later, GREEDY)


def test_add_decode_refuses_a_prompt_of_another_length_and_keeps_the_reservation() -> None:
    core = EngineCore(CFG, num_blocks=16)
    core.reserve_decode("d", 20)
    with pytest.raises(PdorchError) as caught:
        core.add_decode("d", 20, 5, GREEDY, prompt_token_ids=_prompt(21, seed=1))
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    assert core.load().blocks_used == 2
    core.add_decode("d", 20, 5, GREEDY, prompt_token_ids=_prompt(20, seed=1))
    _run(core)
    assert core.load().blocks_used == 0 and core.load().cached_blocks == 1
