"""Chunked prefill: a prompt computed over several steps (or after a cached prefix) equals one pass,
and running decodes keep progressing while a long prompt is prefilled."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from transport.errors import ErrorCode, PdorchError
from transport.messages import SamplingParams
from workers.engines.reference.attention import causal_attention
from workers.engines.reference.config import ModelConfig
from workers.engines.reference.core import EngineCore
from workers.engines.reference.kv_cache import BlockAllocator, PagedKvCache
from workers.engines.reference.model import ReferenceModel
from workers.engines.reference.step_output import StepOutput

CFG = ModelConfig()
MAX_STEPS = 3000
UNCHUNKED = 4096  # a budget no test prompt reaches


@pytest.fixture(scope="module")
def model() -> ReferenceModel:
    return ReferenceModel(CFG)


def _prompt(length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 256, length).tolist()


def _run(core: EngineCore, outputs: dict[str, list[StepOutput]] | None = None) -> dict[str, list[StepOutput]]:
    outputs = {} if outputs is None else outputs
    for _ in range(MAX_STEPS):
        if not core.has_work():
            return outputs
        for out in core.step():
            assert not out.failed, out
            outputs.setdefault(out.request_id, []).append(out)
        core.check_block_accounting()
    raise AssertionError("core did not drain")


def _tokens(outputs: dict[str, list[StepOutput]]) -> dict[str, list[int]]:
    return {rid: [o.token_id for o in outs] for rid, outs in outputs.items()}


# --------------------------------------------------------------------------- the model


def test_attention_of_the_last_queries_equals_slicing_the_full_attention() -> None:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((700, CFG.heads, CFG.head_dim))
    k = rng.standard_normal((700, CFG.kv_heads, CFG.head_dim))
    v = rng.standard_normal((700, CFG.kv_heads, CFG.head_dim))
    full = causal_attention(q, k, v)
    for start in (1, 100, 511, 512, 650, 699):  # crosses the internal query-row chunking
        np.testing.assert_allclose(causal_attention(q[start:], k, v), full[start:], rtol=0, atol=1e-13)
    with pytest.raises(PdorchError):
        causal_attention(q, k[:10], v[:10])


def _prefill_in_chunks(
    model: ReferenceModel,
    prompt: list[int],
    chunk: int,
    on_layer: Callable[[int, np.ndarray], None] | None = None,
) -> tuple[np.ndarray, PagedKvCache, list[int]]:
    cache = PagedKvCache(CFG, 64, 16)
    blocks = BlockAllocator(64).allocate(cache.blocks_for(len(prompt)))
    logits = np.empty(0)
    for start in range(0, len(prompt), chunk):
        last = start + chunk >= len(prompt)
        logits = model.prefill(
            prompt[start : start + chunk], cache, blocks, on_layer if last else None, start
        )
    return logits, cache, blocks


@pytest.mark.parametrize(
    ("length", "chunk"), [(130, 1), (130, 7), (130, 16), (130, 33), (130, 129), (600, 250)]
)
def test_prefill_in_chunks_equals_one_pass(model: ReferenceModel, length: int, chunk: int) -> None:
    prompt = _prompt(length, seed=chunk)
    one_pass: dict[int, np.ndarray] = {}
    whole, whole_cache, whole_blocks = _prefill_in_chunks(model, prompt, length, one_pass.__setitem__)
    chunked: dict[int, np.ndarray] = {}
    logits, cache, blocks = _prefill_in_chunks(model, prompt, chunk, chunked.__setitem__)
    np.testing.assert_allclose(logits, whole, rtol=0, atol=1e-12)
    np.testing.assert_allclose(logits, model.forward_full(prompt)[-1], rtol=0, atol=1e-9)
    assert sorted(chunked) == list(range(CFG.layers))
    for layer in range(CFG.layers):
        # The last chunk's callback still sees every prompt position, as one fresh array.
        assert chunked[layer].shape == (length, *CFG.kv_row_shape)
        np.testing.assert_allclose(chunked[layer], one_pass[layer], rtol=0, atol=1e-12)
        np.testing.assert_array_equal(chunked[layer], cache.gather(layer, blocks, length))
        np.testing.assert_allclose(
            cache.gather(layer, blocks, length),
            whole_cache.gather(layer, whole_blocks, length),
            rtol=0,
            atol=1e-12,
        )


def test_prefill_after_a_prefix_shared_from_another_table(model: ReferenceModel) -> None:
    cache = PagedKvCache(CFG, 16, 16)
    first = _prompt(40, seed=1)
    first_table = [9, 4, 12]
    model.prefill(first, cache, first_table)
    second = first[:32] + _prompt(25, seed=2)
    second_table = [*first_table[:2], 0, 7]  # the two full shared blocks, then its own
    logits = model.prefill(second[32:], cache, second_table, start=32)
    alone = PagedKvCache(CFG, 16, 16)
    np.testing.assert_allclose(logits, model.prefill(second, alone, [1, 2, 3, 4]), rtol=0, atol=1e-12)
    np.testing.assert_allclose(logits, model.forward_full(second)[-1], rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    ("start", "length", "code"), [(-1, 5, ErrorCode.INTERNAL), (2040, 9, ErrorCode.PROMPT_TOO_LONG)]
)
def test_prefill_refuses_impossible_positions(
    model: ReferenceModel, start: int, length: int, code: ErrorCode
) -> None:
    cache = PagedKvCache(CFG, 200, 16)
    with pytest.raises(PdorchError) as caught:
        model.prefill([1] * length, cache, list(range(200)), start=start)
    assert caught.value.code is code


# --------------------------------------------------------------------------- the core


def _requests(seeded: bool) -> dict[str, tuple[list[int], SamplingParams]]:
    shared = _prompt(100, seed=50)  # a common "system prompt" for some requests
    prompts = [
        _prompt(300, seed=1),
        shared + _prompt(150, seed=2),
        _prompt(40, seed=3),
        shared + _prompt(7, seed=4),
        _prompt(129, seed=5),
        shared,
        _prompt(5, seed=6),
    ]
    return {
        f"r{i}": (
            prompt,
            SamplingParams(max_tokens=4 + 3 * i, temperature=0.8 if seeded else 0.0, seed=i, ignore_eos=True),
        )
        for i, prompt in enumerate(prompts)
    }


def _colocated(
    requests: dict[str, tuple[list[int], SamplingParams]], **core_args: object
) -> dict[str, list[int]]:
    core = EngineCore(CFG, num_blocks=256, **core_args)  # type: ignore[arg-type]
    for rid, (prompt, sampling) in requests.items():
        core.add_generate(rid, prompt, sampling)
    tokens = _tokens(_run(core))
    assert core.load().blocks_used == 0
    return tokens


@pytest.mark.parametrize("budget", [7, 64, 200])
@pytest.mark.parametrize("caching", [False, True], ids=["no-cache", "cache"])
def test_chunked_equals_unchunked_tokens(budget: int, caching: bool) -> None:
    requests = _requests(seeded=budget == 64)
    unchunked = _colocated(requests, max_prefill_tokens_per_step=UNCHUNKED, enable_prefix_caching=False)
    chunked = _colocated(requests, max_prefill_tokens_per_step=budget, enable_prefix_caching=caching)
    assert chunked == unchunked


def test_running_decodes_progress_while_a_long_prompt_is_prefilled() -> None:
    budget, long_len = 64, 600
    core = EngineCore(CFG, num_blocks=256, max_prefill_tokens_per_step=budget)
    decoding = {f"d{i}": _prompt(10, seed=i) for i in range(3)}
    for rid, prompt in decoding.items():
        core.add_generate(rid, prompt, SamplingParams(max_tokens=40, ignore_eos=True))
    core.step()  # all three prefilled (30 tokens fit the budget)
    core.add_generate("long", _prompt(long_len, seed=9), SamplingParams(max_tokens=2, ignore_eos=True))
    steps_to_first_token = 0
    while True:
        steps_to_first_token += 1
        outputs = core.step()
        by_request = [o.request_id for o in outputs]
        # Every step of the long prefill also advances each running sequence by one token.
        assert sorted(r for r in by_request if r != "long") == sorted(decoding)
        if "long" in by_request:
            break
        assert core.load().queued_prefill_tokens == long_len - steps_to_first_token * budget
        assert steps_to_first_token < long_len
    assert steps_to_first_token == -(-long_len // budget)


def test_chunked_prefill_only_hands_over_every_layers_whole_kv_once() -> None:
    prompt = _prompt(180, seed=7)
    calls: list[tuple[int, int, np.ndarray]] = []  # (step, layer, rows)
    step = 0
    core = EngineCore(CFG, num_blocks=64, max_prefill_tokens_per_step=50)
    core.add_prefill(
        "p", prompt, SamplingParams(), on_layer=lambda layer, rows: calls.append((step, layer, rows))
    )
    outputs: list[StepOutput] = []
    while core.has_work():
        step += 1
        outputs += core.step()
    assert step == 4 and len(outputs) == 1
    assert [(s, layer) for s, layer, _ in calls] == [(4, layer) for layer in range(CFG.layers)]
    reference: dict[int, np.ndarray] = {}
    unchunked = EngineCore(CFG, num_blocks=64, max_prefill_tokens_per_step=UNCHUNKED)
    unchunked.add_prefill("q", prompt, SamplingParams(), on_layer=reference.__setitem__)
    (first,) = unchunked.step()
    assert first.token_id == outputs[0].token_id
    for _, layer, rows in calls:
        assert rows.shape == (180, *CFG.kv_row_shape)
        np.testing.assert_allclose(rows, reference[layer], rtol=0, atol=1e-12)


def _disaggregated(
    requests: dict[str, tuple[list[int], SamplingParams]], budget: int
) -> dict[str, list[int]]:
    """Prefill on one core, scatter the KV into another's reserved blocks, decode there."""
    prefill = EngineCore(CFG, num_blocks=256, max_prefill_tokens_per_step=budget)
    kv: dict[str, dict[int, np.ndarray]] = {rid: {} for rid in requests}
    for rid, (prompt, sampling) in requests.items():
        prefill.add_prefill(rid, prompt, sampling, on_layer=kv[rid].__setitem__)
    first = _tokens(_run(prefill))
    assert prefill.load().blocks_used == 0 and prefill.load().cached_blocks > 0
    decode = EngineCore(CFG, num_blocks=512, block_size=8, max_prefill_tokens_per_step=budget)
    for rid, (prompt, sampling) in requests.items():
        blocks = decode.reserve_decode(rid, len(prompt))
        for layer, rows in kv[rid].items():
            decode.cache.scatter(layer, blocks, 0, rows)
        decode.add_decode(rid, len(prompt), first[rid][0], sampling, prompt_token_ids=prompt)
    rest = _tokens(_run(decode))
    assert decode.load().blocks_used == 0 and decode.load().cached_blocks > 0
    return {rid: first[rid] + rest[rid] for rid in requests}


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_split_equals_colocated_with_caching_and_chunking(seeded: bool) -> None:
    requests = _requests(seeded)
    colocated = _colocated(requests, max_prefill_tokens_per_step=64)
    assert _disaggregated(requests, budget=64) == colocated
    # And equal to each request computed alone, without cache or chunks.
    for rid, request in requests.items():
        alone = _colocated({rid: request}, max_prefill_tokens_per_step=UNCHUNKED, enable_prefix_caching=False)
        assert alone[rid] == colocated[rid]


def test_cancel_during_a_chunked_prefill_keeps_only_the_computed_prefix() -> None:
    core = EngineCore(CFG, num_blocks=64, max_prefill_tokens_per_step=40)
    core.add_generate("g", _prompt(200, seed=3), SamplingParams())
    assert core.step() == [] and core.step() == []  # 80 tokens computed: 5 full blocks
    load = core.load()
    assert (load.running, load.queued_prefill_tokens, load.blocks_used) == (1, 120, 13)
    core.cancel("g")
    assert core.step() == []
    assert (core.load().blocks_used, core.load().cached_blocks, core.load().running) == (0, 5, 0)
    assert not core.has_work()
    core.check_block_accounting()


def test_colocated_prompts_being_prefilled_hold_their_batch_slot() -> None:
    core = EngineCore(CFG, num_blocks=64, max_batch=1, max_prefill_tokens_per_step=16)
    core.add_generate("g", _prompt(100, seed=1), SamplingParams(max_tokens=3, ignore_eos=True))
    core.step()  # "g" is being prefilled: it owns the only slot
    core.reserve_decode("d", 5)
    core.add_decode("d", 5, 66, SamplingParams(max_tokens=3, ignore_eos=True))
    order: list[str] = []
    for _ in range(MAX_STEPS):
        if not core.has_work():
            break
        outputs = core.step()
        assert len({o.request_id for o in outputs}) <= 1
        order += [o.request_id for o in outputs]
    assert order == ["g"] * 3 + ["d"] * 2


def test_steps_report_computed_tokens_even_without_output() -> None:
    # 8 blocks of 4 tokens; "first" (20 + up to 8 tokens) leaves no room to admit "second".
    core = EngineCore(CFG, num_blocks=8, block_size=4, max_prefill_tokens_per_step=8)
    core.add_generate("first", _prompt(20, seed=1), SamplingParams(max_tokens=8, ignore_eos=True))
    progress = []
    for _ in range(3):
        outputs = core.step()
        progress.append((len(outputs), core.last_step_computed_tokens))
    assert progress == [(0, 8), (0, 8), (1, 4)]  # chunks of 8, 8, then the last 4 and token 0
    core.add_generate("second", _prompt(12, seed=2), SamplingParams(max_tokens=2, ignore_eos=True))
    core.step()
    assert core.last_step_computed_tokens == 1  # one decode; "second" waits for blocks
    core.cancel("first")
    core.step()
    assert core.last_step_computed_tokens == 8  # "second" admitted now that blocks are back
    blocked = EngineCore(CFG, num_blocks=8, block_size=4)
    blocked.reserve_decode("hog", 28)  # takes all 8 blocks
    blocked.add_generate("starved", _prompt(5, seed=3), SamplingParams())
    assert blocked.step() == [] and blocked.last_step_computed_tokens == 0
    assert blocked.has_work()
