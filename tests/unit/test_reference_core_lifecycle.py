"""The core's request lifecycle: stop rules, cancel, block pressure, load, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from transport.errors import ErrorCode, PdorchError
from transport.messages import FinishReason, SamplingParams
from workers.engines.reference.config import ModelConfig
from workers.engines.reference.core import EngineCore
from workers.engines.reference.step_output import StepOutput

CFG = ModelConfig()
MAX_STEPS = 2000


def _prompt(length: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 256, length).tolist()


def _run(core: EngineCore) -> dict[str, list[StepOutput]]:
    """Step until idle; every request's outputs in order."""
    outputs: dict[str, list[StepOutput]] = {}
    for _ in range(MAX_STEPS):
        if not core.has_work():
            return outputs
        for out in core.step():
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError("core did not drain")


def _generate(cfg: ModelConfig, prompt: list[int], sampling: SamplingParams) -> list[StepOutput]:
    core = EngineCore(cfg, num_blocks=256)
    core.add_generate("r", prompt, sampling)
    outputs = _run(core)["r"]
    assert core.load().blocks_used == 0
    return outputs


PROMPT = _prompt(25, seed=7)
NATURAL = [o.token_id for o in _generate(CFG, PROMPT, SamplingParams(max_tokens=30, ignore_eos=True))]


def _first_new_token_after(index: int) -> tuple[int, int]:
    """A token whose first occurrence in NATURAL is at or after ``index``: (position, token)."""
    for position in range(index, len(NATURAL)):
        if NATURAL[position] not in NATURAL[:position]:
            return position, NATURAL[position]
    raise AssertionError("greedy output too repetitive for this test")


# --------------------------------------------------------------------------- stop rules


def test_only_the_last_output_carries_a_finish_reason() -> None:
    outputs = _generate(CFG, PROMPT, SamplingParams(max_tokens=12, ignore_eos=True))
    assert [o.finish_reason for o in outputs] == [None] * 11 + [FinishReason.LENGTH]
    assert [o.token_id for o in outputs] == NATURAL[:12]


@pytest.mark.parametrize("max_tokens", [1, 2, 16, 30])
def test_max_tokens_counts_every_generated_token(max_tokens: int) -> None:
    outputs = _generate(CFG, PROMPT, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    assert len(outputs) == max_tokens
    assert outputs[-1].finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("at", [0, 5])
def test_stop_token_ends_with_stop(at: int) -> None:
    position, token = _first_new_token_after(at)
    outputs = _generate(CFG, PROMPT, SamplingParams(max_tokens=30, stop_token_ids=[token], ignore_eos=True))
    assert [o.token_id for o in outputs] == NATURAL[: position + 1]
    assert outputs[-1].finish_reason is FinishReason.STOP


def test_eos_stops_unless_ignored() -> None:
    position, token = _first_new_token_after(3)
    cfg = ModelConfig(eos_token_id=token)  # same weights, another EOS id
    stopped = _generate(cfg, PROMPT, SamplingParams(max_tokens=30))
    assert [o.token_id for o in stopped] == NATURAL[: position + 1]
    assert stopped[-1].finish_reason is FinishReason.STOP
    ignored = _generate(cfg, PROMPT, SamplingParams(max_tokens=30, ignore_eos=True))
    assert [o.token_id for o in ignored] == NATURAL
    assert ignored[-1].finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize(("prompt_len", "expected_tokens"), [(30, 10), (38, 2), (39, 1), (40, 1)])
def test_context_limit_ends_with_length(prompt_len: int, expected_tokens: int) -> None:
    cfg = ModelConfig(max_model_len=40)
    outputs = _generate(cfg, _prompt(prompt_len), SamplingParams(max_tokens=100, ignore_eos=True))
    assert len(outputs) == expected_tokens
    assert outputs[-1].finish_reason is FinishReason.LENGTH


def test_context_limit_holds_across_a_handoff() -> None:
    cfg = ModelConfig(max_model_len=40)
    prompt = _prompt(37)
    sampling = SamplingParams(max_tokens=100, ignore_eos=True)
    prefill = EngineCore(cfg, num_blocks=16)
    kv: dict[int, np.ndarray] = {}
    prefill.add_prefill("r", prompt, sampling, on_layer=kv.__setitem__)
    (first,) = prefill.step()
    assert first.finish_reason is None
    decode = EngineCore(cfg, num_blocks=16)
    blocks = decode.reserve_decode("r", 37)
    for layer, rows in kv.items():
        decode.cache.scatter(layer, blocks, 0, rows)
    decode.add_decode("r", 37, first.token_id, sampling)
    rest = _run(decode)["r"]
    assert len(rest) == 2
    assert rest[-1].finish_reason is FinishReason.LENGTH


# --------------------------------------------------------------------------- cancel


def test_cancel_running_frees_blocks_and_silences_the_request() -> None:
    core = EngineCore(CFG, num_blocks=64)
    core.add_generate("r", _prompt(40), SamplingParams(max_tokens=100, ignore_eos=True))
    core.step()
    assert core.load().blocks_used == 3
    core.cancel("r")
    assert all(o.request_id != "r" for o in core.step())
    assert core.load().blocks_used == 0
    assert not core.has_work()
    core.cancel("r")  # idempotent
    core.add_generate("r", _prompt(4), SamplingParams(max_tokens=1))  # the id is free again
    assert [o.finish_reason for o in core.step()] == [FinishReason.LENGTH]


def test_cancel_before_the_first_step_emits_nothing() -> None:
    core = EngineCore(CFG, num_blocks=64)
    core.add_generate("r", _prompt(40), SamplingParams(max_tokens=5))
    core.add_prefill("p", _prompt(40), SamplingParams(max_tokens=5))
    core.cancel("r")
    core.cancel("p")
    assert core.step() == []
    assert core.load() == core.load().__class__(blocks_total=64, adapter_slots=4)
    assert not core.has_work()


def test_cancel_reserved_frees_at_once() -> None:
    core = EngineCore(CFG, num_blocks=64)
    blocks = core.reserve_decode("d", 100)
    assert len(blocks) == 7 and core.load().blocks_used == 7
    core.cancel("d")
    assert core.load().blocks_used == 0
    with pytest.raises(PdorchError):
        core.add_decode("d", 100, 5, SamplingParams())


def test_cancel_started_decode_frees_its_blocks() -> None:
    core = EngineCore(CFG, num_blocks=64)
    core.reserve_decode("d", 30)
    core.add_decode("d", 30, 65, SamplingParams(max_tokens=50, ignore_eos=True))
    core.step()
    assert core.load().running == 1
    core.cancel("d")
    core.step()
    assert core.load().blocks_used == 0 and core.load().running == 0


def test_cancel_unknown_is_ignored() -> None:
    EngineCore(CFG, num_blocks=4).cancel("nobody")


# --------------------------------------------------------------------------- block pressure


def test_out_of_blocks_fails_the_newest_and_never_deadlocks() -> None:
    # 8 blocks of 4 tokens. Three requests of 6 + 20 tokens fit one at a time, not together.
    core = EngineCore(CFG, num_blocks=8, block_size=4)
    sampling = SamplingParams(max_tokens=20, ignore_eos=True)
    prompts = {f"r{i}": _prompt(6, seed=i) for i in range(3)}
    for rid, prompt in prompts.items():
        core.add_generate(rid, prompt, sampling)
    outputs = _run(core)
    assert core.load().blocks_used == 0
    failed = {rid for rid, outs in outputs.items() if outs[-1].failed}
    finished = {rid for rid, outs in outputs.items() if outs[-1].finish_reason is FinishReason.LENGTH}
    assert failed and finished and failed | finished == set(prompts)
    assert all(outputs[rid][-1].error is ErrorCode.OUT_OF_BLOCKS for rid in failed)
    for rid in finished:  # the survivors' tokens are untouched by the failures around them
        alone = _generate(CFG, prompts[rid], sampling)
        assert [o.token_id for o in outputs[rid]] == [o.token_id for o in alone]


def test_waiting_prompt_waits_for_blocks_instead_of_failing() -> None:
    core = EngineCore(CFG, num_blocks=8, block_size=4)
    core.add_generate("big", _prompt(20, seed=1), SamplingParams(max_tokens=8, ignore_eos=True))
    core.add_generate("small", _prompt(12, seed=2), SamplingParams(max_tokens=4, ignore_eos=True))
    assert [o.request_id for o in core.step()] == ["big"]
    assert (core.load().running, core.load().waiting) == (1, 1)  # "small" is held back, not failed
    outputs = _run(core)
    outputs["big"].insert(0, StepOutput("big"))
    assert [len(outputs["big"]), len(outputs["small"])] == [8, 4]
    assert not any(o.failed for outs in outputs.values() for o in outs)


def test_prompt_that_can_never_fit_fails_without_blocking_others() -> None:
    core = EngineCore(CFG, num_blocks=8, block_size=4)
    core.add_generate("huge", _prompt(40), SamplingParams())
    core.add_generate("ok", _prompt(5), SamplingParams(max_tokens=3))
    outputs = _run(core)
    assert outputs["huge"][-1].error is ErrorCode.OUT_OF_BLOCKS
    assert len(outputs["ok"]) == 3 and not outputs["ok"][-1].failed


def test_reserve_beyond_capacity_is_out_of_blocks() -> None:
    core = EngineCore(CFG, num_blocks=4, block_size=4)
    with pytest.raises(PdorchError) as caught:
        core.reserve_decode("d", 16)  # 17 tokens need 5 blocks
    assert caught.value.code is ErrorCode.OUT_OF_BLOCKS
    assert core.load().blocks_used == 0


def test_max_batch_bounds_running_sequences() -> None:
    core = EngineCore(CFG, num_blocks=256, max_batch=3)
    for i in range(7):
        core.add_generate(f"r{i}", _prompt(10, seed=i), SamplingParams(max_tokens=6, ignore_eos=True))
    peak = 0
    finished = 0
    for _ in range(MAX_STEPS):
        if not core.has_work():
            break
        finished += sum(o.finish_reason is not None for o in core.step())
        peak = max(peak, core.load().running)
    assert peak == 3
    assert finished == 7


def test_prefill_budget_spreads_prompts_over_steps() -> None:
    # No prefix cache here: "long" starts like "p0" and would skip part of its work.
    core = EngineCore(CFG, num_blocks=256, max_prefill_tokens_per_step=100, enable_prefix_caching=False)
    for i in range(4):
        core.add_prefill(f"p{i}", _prompt(45, seed=i), SamplingParams())
    core.add_prefill("long", _prompt(150), SamplingParams())
    per_step: list[tuple[list[str], int]] = []
    for _ in range(5):
        outputs = sorted(o.request_id for o in core.step())
        per_step.append((outputs, core.load().queued_prefill_tokens))
    # The budget is filled by splitting prompts into chunks: p2 starts with the 10 tokens left in
    # step 1, "long" with 20 in step 2, then takes 100 and the last 30.
    assert per_step == [
        (["p0", "p1"], 35 + 45 + 150),
        (["p2", "p3"], 130),
        ([], 30),
        (["long"], 0),
        ([], 0),
    ]


def test_handed_off_decode_waits_for_a_batch_slot() -> None:
    core = EngineCore(CFG, num_blocks=64, max_batch=1)
    core.add_generate("g", _prompt(5), SamplingParams(max_tokens=4, ignore_eos=True))
    core.step()
    core.reserve_decode("d", 5)
    core.add_decode("d", 5, 66, SamplingParams(max_tokens=3, ignore_eos=True))
    assert core.load().waiting == 1
    outputs = _run(core)
    assert len(outputs["g"]) == 3 and len(outputs["d"]) == 2


def test_failing_kv_callback_fails_only_that_request() -> None:
    def broken(layer: int, rows: np.ndarray) -> None:
        raise PdorchError(ErrorCode.KV_TIMEOUT, "peer gone")

    core = EngineCore(CFG, num_blocks=64)
    core.add_prefill("bad", _prompt(30), SamplingParams(), on_layer=broken)
    core.add_generate("good", _prompt(30), SamplingParams(max_tokens=3))
    outputs = _run(core)
    assert outputs["bad"][-1].error is ErrorCode.KV_TIMEOUT
    assert outputs["bad"][-1].as_error().message == "peer gone"
    assert len(outputs["good"]) == 3
    assert core.load().blocks_used == 0


# --------------------------------------------------------------------------- load


def test_load_counts_are_exact() -> None:
    core = EngineCore(CFG, num_blocks=64, block_size=16)
    core.add_generate("g", _prompt(40), SamplingParams(max_tokens=50, ignore_eos=True))
    core.add_prefill("p", _prompt(10), SamplingParams())
    load = core.load()
    assert (load.waiting, load.queued_prefill_tokens, load.running, load.blocks_used) == (2, 50, 0, 0)
    core.step()
    load = core.load()
    assert (load.waiting, load.queued_prefill_tokens, load.running, load.blocks_used) == (0, 0, 1, 3)
    core.reserve_decode("d", 20)
    assert core.load().blocks_used == 5
    assert core.load().blocks_total == 64
    core.cancel("d")
    core.cancel("g")
    core.step()
    assert core.load().blocks_used == 0


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("prompt", "sampling", "code"),
    [
        ([], SamplingParams(), ErrorCode.INVALID_REQUEST),
        ([1] * (CFG.max_model_len + 1), SamplingParams(), ErrorCode.PROMPT_TOO_LONG),
        ([300], SamplingParams(), ErrorCode.INVALID_REQUEST),
        ([1, 2], SamplingParams(max_tokens=0), ErrorCode.INVALID_REQUEST),
        ([1, 2], SamplingParams(top_p=0.0), ErrorCode.INVALID_REQUEST),
    ],
)
def test_bad_requests_are_refused_up_front(
    prompt: list[int], sampling: SamplingParams, code: ErrorCode
) -> None:
    core = EngineCore(CFG, num_blocks=8)
    for add in (core.add_generate, core.add_prefill):
        with pytest.raises(PdorchError) as caught:
            add("r", prompt, sampling)
        assert caught.value.code is code
    assert not core.has_work()


def test_request_ids_must_be_unique() -> None:
    core = EngineCore(CFG, num_blocks=8)
    core.add_generate("r", [1], SamplingParams())
    core.reserve_decode("d", 3)
    for clash in (
        lambda: core.add_prefill("r", [1], SamplingParams()),
        lambda: core.reserve_decode("r", 3),
        lambda: core.add_generate("d", [1], SamplingParams()),
    ):
        with pytest.raises(PdorchError) as caught:
            clash()
        assert caught.value.code is ErrorCode.INVALID_REQUEST


@pytest.mark.parametrize(
    ("reserve", "prompt_len", "first_token", "sampling"),
    [
        (None, 10, 5, SamplingParams()),  # nothing reserved
        (10, 11, 5, SamplingParams()),  # reserved for another length
        (10, 10, 999, SamplingParams()),  # token outside the vocabulary
        (10, 10, 5, SamplingParams(max_tokens=1)),  # token 0 already ended it
        (10, 10, CFG.eos_token_id, SamplingParams()),  # so did EOS
    ],
)
def test_bad_add_decode_is_refused_and_keeps_the_reservation(
    reserve: int | None, prompt_len: int, first_token: int, sampling: SamplingParams
) -> None:
    core = EngineCore(CFG, num_blocks=8)
    if reserve is not None:
        core.reserve_decode("d", reserve)
    used = core.load().blocks_used
    with pytest.raises(PdorchError) as caught:
        core.add_decode("d", prompt_len, first_token, sampling)
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    assert core.load().blocks_used == used
    core.cancel("d")
    assert core.load().blocks_used == 0


@pytest.mark.parametrize(
    ("num_prompt_tokens", "code"), [(0, ErrorCode.INVALID_REQUEST), (2048, ErrorCode.PROMPT_TOO_LONG)]
)
def test_reserve_decode_checks_the_prompt_length(num_prompt_tokens: int, code: ErrorCode) -> None:
    with pytest.raises(PdorchError) as caught:
        EngineCore(CFG, num_blocks=256).reserve_decode("d", num_prompt_tokens)
    assert caught.value.code is code


def test_core_config_is_validated() -> None:
    for kwargs in ({"max_batch": 0}, {"max_prefill_tokens_per_step": 0}, {"num_blocks": 0}):
        with pytest.raises(PdorchError) as caught:
            EngineCore(CFG, **{"num_blocks": 8, **kwargs})  # type: ignore[arg-type]
        assert caught.value.code is ErrorCode.CONFIG
