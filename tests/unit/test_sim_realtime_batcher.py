"""The simulated engine's batching core in model time: iterations, tokens, KV accounting, preemption."""

from __future__ import annotations

import math

import pytest

from transport.errors import ErrorCode, PdorchError
from transport.messages import FinishReason, SamplingParams
from transport.prefix_hash import prefix_block_hashes
from workers.engines.sim.batcher import BatcherParams, SimBatcher, SimOutput
from workers.engines.sim.cost import LLAMA3_8B, CostModel
from workers.engines.sim.tokens import SimTokenStream

COST = CostModel("h100", 2, LLAMA3_8B)
BLOCK = 16
NEVER_EOS = 1e12


def make(num_blocks: int = 10_000, **params: object) -> SimBatcher:
    return SimBatcher(COST, BatcherParams(num_blocks=num_blocks, block_size=BLOCK, **params))  # type: ignore[arg-type]


def stream(prompt: list[int], max_tokens: int, *, mean: float = NEVER_EOS, seed: int = 0) -> SimTokenStream:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=1.0 if seed else 0.0, seed=seed)
    return SimTokenStream(0, prompt, sampling, mean_output_tokens=mean, max_model_len=8192)


def prompt(n: int, salt: int = 0) -> list[int]:
    return [(i * 7 + salt) % 256 for i in range(n)]


def run(core: SimBatcher, until: float = math.inf, limit: int = 100_000) -> list[tuple[float, SimOutput]]:
    """Advance event by event; return every output with the time it came out."""
    got: list[tuple[float, SimOutput]] = []
    for _ in range(limit):
        t = core.next_event_time()
        if t > until or t == math.inf:
            return got
        got += [(t, out) for out in core.advance(t)]
        check_accounting(core)
    raise AssertionError("the engine did not settle")


def check_accounting(core: SimBatcher) -> None:
    pool = core.pool
    assert pool.used + pool.cached + pool.free == pool.total
    assert min(pool.used, pool.cached, pool.free) >= 0


def token_ids(outputs: list[tuple[float, SimOutput]], rid: str) -> list[int]:
    return [t for _, out in outputs if out.request_id == rid for t in out.token_ids]


def finish(outputs: list[tuple[float, SimOutput]], rid: str) -> FinishReason | None:
    reasons = [out.finish_reason for _, out in outputs if out.request_id == rid]
    return reasons[-1] if reasons else None


def test_generate_takes_the_modeled_times_and_yields_the_stream_tokens() -> None:
    core = make()
    p = prompt(100)
    s = stream(p, 5, seed=3)
    core.add_prefill(0.0, "a", s, prefix_block_hashes(p, BLOCK), decode_here=True)
    outputs = run(core)
    assert token_ids(outputs, "a") == [s.token(i) for i in range(5)]
    assert finish(outputs, "a") is FinishReason.LENGTH
    first_at = COST.prefill_ms(0, 100) / 1e3
    assert outputs[0][0] == pytest.approx(first_at)
    # Then one token per decode step of a batch of one, whose context grows by one each step.
    steps = [COST.decode_step_ms(1, 100 + i) / 1e3 for i in range(4)]
    assert [t for t, _ in outputs[1:]] == pytest.approx([first_at + sum(steps[: i + 1]) for i in range(4)])
    assert core.stats.decode_iterations == 4 and core.stats.tokens == 4
    assert core.load().blocks_used == 0
    assert core.load().cached_blocks == 100 // BLOCK  # the prompt's full blocks stay cached


def test_requests_decode_together_in_one_batch() -> None:
    core = make()
    for i in range(4):
        p = prompt(40, salt=i)
        core.add_prefill(0.0, f"r{i}", stream(p, 20), prefix_block_hashes(p, BLOCK), decode_here=True)
    outputs = run(core)
    assert all(len(token_ids(outputs, f"r{i}")) == 20 for i in range(4))
    assert core.stats.tokens == 4 * 19
    # Continuous batching: far fewer decode iterations than decoded tokens.
    assert core.stats.peak_running == 4
    assert core.stats.decode_iterations < 19 + 4 * 2
    # Several requests got a token at the same instant.
    times = [t for t, out in outputs if len(out.token_ids) == 1 and out.finish_reason is None]
    assert max(times.count(t) for t in set(times)) == 4


def test_a_request_joins_a_running_batch() -> None:
    core = make()
    p1, p2 = prompt(30), prompt(30, salt=1)
    core.add_prefill(0.0, "early", stream(p1, 50), prefix_block_hashes(p1, BLOCK), decode_here=True)
    run(core, until=0.1)
    assert core.load().running == 1
    core.add_prefill(0.1, "late", stream(p2, 10), prefix_block_hashes(p2, BLOCK), decode_here=True)
    outputs = run(core)
    assert len(token_ids(outputs, "late")) == 10
    assert core.stats.peak_running == 2


def test_max_batch_caps_the_running_batch() -> None:
    core = make(max_batch=2)
    for i in range(5):
        p = prompt(20, salt=i)
        core.add_prefill(0.0, f"r{i}", stream(p, 100), prefix_block_hashes(p, BLOCK), decode_here=True)
    run(core, until=0.05)  # every prompt is done; two of them decode
    load = core.load()
    assert load.running == 2 and load.waiting == 3
    outputs = run(core)
    assert all(finish(outputs, f"r{i}") is FinishReason.LENGTH for i in range(5))
    assert core.stats.peak_running == 2


def test_a_long_prompt_is_chunked_while_others_decode() -> None:
    core = make(chunk_tokens=256)
    short = prompt(10)
    core.add_prefill(0.0, "d", stream(short, 200), prefix_block_hashes(short, BLOCK), decode_here=True)
    run(core, until=0.05)
    before = core.stats.prefill_iterations
    long = prompt(1000, salt=5)
    core.add_prefill(0.05, "long", stream(long, 2), prefix_block_hashes(long, BLOCK), decode_here=True)
    assert core.load().queued_prefill_tokens >= 1000 - 256
    run(core)
    assert core.stats.prefill_iterations - before == math.ceil(1000 / 256)


def test_handoff_holds_the_kv_until_released() -> None:
    core = make()
    p = prompt(100)
    s = stream(p, 10)
    core.add_prefill(0.0, "h", s, prefix_block_hashes(p, BLOCK), decode_here=False)
    assert core.load().queued_prefill_tokens == 100
    outputs = run(core)
    assert [out.token_ids for _, out in outputs] == [[s.token(0)]]
    assert outputs[0][1].finish_reason is None
    load = core.load()
    assert (
        load.blocks_used == math.ceil(100 / BLOCK) and load.running == 0 and load.queued_prefill_tokens == 0
    )
    core.release(1.0, "h")
    assert core.load().blocks_used == 0
    assert core.load().cached_blocks == 100 // BLOCK
    assert not core.holds("h")


def test_decode_reserves_then_continues_from_token_one() -> None:
    core = make()
    p = prompt(64)
    s = stream(p, 6, seed=9)
    core.reserve_decode(0.0, "d", s, prefix_block_hashes(p, BLOCK))
    assert core.load().blocks_used == math.ceil(65 / BLOCK)
    assert core.next_event_time() == math.inf  # nothing to do until the KV is here
    core.start_decode(0.5, "d", s.token(0))
    outputs = run(core)
    assert token_ids(outputs, "d") == [s.token(i) for i in range(1, 6)]
    assert core.stats.prefill_iterations == 0
    assert core.load().blocks_used == 0 and core.load().cached_blocks == 64 // BLOCK


def test_decode_reservation_fails_without_room_and_a_release_makes_room() -> None:
    core = make(num_blocks=10)
    big = prompt(120)
    core.reserve_decode(0.0, "a", stream(big, 4), [])
    with pytest.raises(PdorchError) as e:
        core.reserve_decode(0.0, "b", stream(big, 4), [])
    assert e.value.code is ErrorCode.OUT_OF_BLOCKS
    core.release(0.0, "a")
    core.reserve_decode(0.0, "b", stream(big, 4), [])
    with pytest.raises(PdorchError) as e:
        core.reserve_decode(0.0, "huge", stream(prompt(400), 4), [])
    assert e.value.code is ErrorCode.OUT_OF_BLOCKS


def test_start_decode_refuses_a_finished_first_token_or_no_reservation() -> None:
    core = make()
    p = prompt(10)
    with pytest.raises(PdorchError):
        core.start_decode(0.0, "nobody", 65)
    core.reserve_decode(0.0, "one", stream(p, 1), [])
    with pytest.raises(PdorchError) as e:
        core.start_decode(0.0, "one", 65)  # max_tokens 1: token 0 was the whole answer
    assert e.value.code is ErrorCode.INVALID_REQUEST


def test_release_mid_decode_frees_the_blocks_and_silences_the_request() -> None:
    core = make()
    p = prompt(200)
    core.add_prefill(0.0, "x", stream(p, 10_000), [], decode_here=True)
    core.add_prefill(0.0, "y", stream(prompt(50, 1), 30), [], decode_here=True)
    run(core, until=0.05)
    assert core.load().running == 2
    used = core.load().blocks_used
    core.release(0.05, "x")
    assert core.load().blocks_used < used - math.ceil(200 / BLOCK) + 1
    outputs = run(core)
    assert token_ids(outputs, "x") == []
    assert finish(outputs, "y") is FinishReason.LENGTH
    assert core.load().blocks_used == 0


def test_release_of_a_prompt_being_prefilled_or_queued() -> None:
    core = make()
    core.add_prefill(0.0, "a", stream(prompt(2000), 5), [], decode_here=True)
    core.add_prefill(0.0, "b", stream(prompt(100, 1), 5), [], decode_here=True)
    core.release(0.0001, "a")  # its prefill iteration is in flight
    core.release(0.0001, "b")  # still queued
    outputs = run(core)
    assert outputs == []
    assert core.load() == core.load().__class__(blocks_total=core.pool.total)


def test_full_kv_preempts_the_newest_and_everyone_still_gets_their_tokens() -> None:
    # 12 blocks: three 40-token prompts (3 blocks each) that each grow to 70 tokens (5 blocks).
    core = make(num_blocks=12, enable_prefix_caching=False)
    streams = {}
    for i in range(3):
        p = prompt(40, salt=i)
        streams[f"r{i}"] = s = stream(p, 30, seed=i + 1)
        core.add_prefill(0.0, f"r{i}", s, [], decode_here=True)
    outputs = run(core)
    assert core.stats.preemptions > 0
    for rid, s in streams.items():
        assert token_ids(outputs, rid) == [s.token(i) for i in range(30)]
    assert core.load().blocks_used == 0


def test_prefix_cache_hits_shorten_the_prefill() -> None:
    core = make()
    shared = prompt(320)
    first = stream(shared, 1)
    core.add_prefill(0.0, "a", first, prefix_block_hashes(shared, BLOCK), decode_here=True)
    (_, out_a), *_ = run(core)
    assert out_a.cached_tokens == 0
    again = [*shared, 1, 2, 3]
    core.add_prefill(10.0, "b", stream(again, 1), prefix_block_hashes(again, BLOCK), decode_here=True)
    (t_b, out_b), *_ = run(core)
    assert out_b.cached_tokens == 320
    assert t_b - 10.0 == pytest.approx(COST.prefill_ms(320, 323) / 1e3)
    assert core.stats.cached_tokens == 320


def test_duplicates_and_impossible_prompts_are_refused() -> None:
    core = make(num_blocks=4)
    p = prompt(10)
    core.add_prefill(0.0, "a", stream(p, 2), [], decode_here=True)
    with pytest.raises(PdorchError) as e:
        core.add_prefill(0.0, "a", stream(p, 2), [], decode_here=True)
    assert e.value.code is ErrorCode.INVALID_REQUEST
    with pytest.raises(PdorchError) as e:
        core.add_prefill(0.0, "big", stream(prompt(100), 2), [], decode_here=True)
    assert e.value.code is ErrorCode.OUT_OF_BLOCKS


def test_a_prompt_waits_for_blocks_held_by_a_handoff() -> None:
    core = make(num_blocks=8)
    core.add_prefill(0.0, "held", stream(prompt(100), 5), [], decode_here=False)
    run(core)
    core.add_prefill(1.0, "next", stream(prompt(60, 1), 3), [], decode_here=True)
    assert core.next_event_time() == math.inf  # 7 of 8 blocks are held; it needs 4
    assert core.load().waiting == 1
    core.release(2.0, "held")
    outputs = run(core)
    assert finish(outputs, "next") is FinishReason.LENGTH
    assert outputs[0][0] == pytest.approx(2.0 + COST.prefill_ms(0, 60) / 1e3)


def test_decode_at_once_gives_the_stepped_tokens_with_no_decode_iteration() -> None:
    """No modelled time (``decode_at_once``): a sequence that joins the batch decodes to its end in
    one pass, with the tokens and finish of stepping, and its blocks are freed."""
    p, q = prompt(100), prompt(64, salt=3)
    outputs = {}
    for at_once in (False, True):
        core = make(decode_at_once=at_once)
        generated = stream(p, 300, mean=40.0, seed=5)  # EOS most likely before max_tokens
        decoded = stream(q, 200, seed=2)
        core.add_prefill(0.0, "g", generated, prefix_block_hashes(p, BLOCK), decode_here=True)
        core.reserve_decode(0.0, "d", decoded, prefix_block_hashes(q, BLOCK))
        core.start_decode(0.0, "d", decoded.token(0))
        got = run(core) + [(core.t, out) for out in core.advance(core.t)]
        outputs[at_once] = {rid: (token_ids(got, rid), finish(got, rid)) for rid in ("g", "d")}
        if at_once:
            assert core.stats.decode_iterations == 0
            assert [len(out.token_ids) for _, out in got if out.request_id == "d"] == [199]
        assert core.load().blocks_used == 0
    assert outputs[True] == outputs[False]
    assert outputs[True]["d"][1] is FinishReason.LENGTH


def test_decode_at_once_steps_a_sequence_whose_kv_would_not_fit() -> None:
    core = make(num_blocks=20, decode_at_once=True)
    held = prompt(160, salt=1)
    core.add_prefill(0.0, "h", stream(held, 10), prefix_block_hashes(held, BLOCK), decode_here=False)
    run(core)  # the handoff holds 10 of the 20 blocks
    p = prompt(50)
    s = stream(p, 200)  # 250 tokens of KV at its end: 16 blocks
    core.add_prefill(core.t, "g", s, prefix_block_hashes(p, BLOCK), decode_here=True)
    got = run(core, until=core.t + 1.0)
    assert core.stats.decode_iterations > 0  # it stepped, and is stuck until the handoff goes
    assert finish(got, "g") is None
    core.release(core.t, "h")
    got += run(core) + [(core.t, out) for out in core.advance(core.t)]
    assert token_ids(got, "g") == [s.token(i) for i in range(200)]
    assert finish(got, "g") is FinishReason.LENGTH
