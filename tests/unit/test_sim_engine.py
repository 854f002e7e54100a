"""The virtual-time simulated engine: batching, KV capacity, preemption, prefix cache, events."""

from __future__ import annotations

import math

import numpy as np
import pytest

from simulate.fluid import EngineParams, EventKind, SimEngine
from workers.engines.sim.cost import CostModel

COST = CostModel("h100", 4)


def run(engine: SimEngine, until: float = math.inf, step_limit: int = 100_000) -> list:
    """Advance through every event (up to ``until``); return them all."""
    events = []
    for _ in range(step_limit):
        t = engine.next_event_time()
        if t > until or t == math.inf:
            break
        events += engine.advance(t)
    else:
        raise AssertionError("engine did not settle")
    return events


def kinds(events: list, rid: int) -> list[EventKind]:
    return [e.kind for e in events if e.rid == rid]


def test_handoff_prefill_takes_the_cost_model_time_and_holds_kv() -> None:
    e = SimEngine(COST, EngineParams(chunk_tokens=512))
    e.submit_prefill(0.0, 1, 4000, (), decode_here=False, output_len=10)
    events = run(e)
    assert [(ev.kind, ev.rid) for ev in events] == [(EventKind.PREFILL_DONE, 1)]
    assert events[0].time == pytest.approx(COST.prefill_ms(0, 4000) / 1e3)
    assert e.load_at(10.0).blocks_used == math.ceil(4000 / 16)  # held for the transfer
    e.release(10.0, 1)
    assert e.load_at(10.0).blocks_used == 0 and e.idle


def test_local_request_decodes_at_the_step_time() -> None:
    e = SimEngine(COST)
    e.submit_prefill(0.0, 1, 1000, (), decode_here=True, output_len=101)
    events = run(e)
    assert kinds(events, 1) == [EventKind.PREFILL_DONE, EventKind.FINISHED]
    first, done = events[0].time, events[1].time
    # 100 decode steps of one sequence whose context grows from 1000 to 1100 tokens.
    expected = sum(COST.decode_step_ms(1, 1000 + k) for k in range(100)) / 1e3
    assert done - first == pytest.approx(expected, rel=0.01)
    assert e.idle


def test_prefix_cache_skips_cached_blocks() -> None:
    e = SimEngine(COST, EngineParams(prefix_block_tokens=512))
    hashes = tuple(range(1, 9))  # 8 blocks of 512 = 4096 tokens
    e.submit_prefill(0.0, 1, 4096, hashes, decode_here=False, output_len=2)
    cold = run(e)[0].time
    e.release(cold, 1)
    e.submit_prefill(cold, 2, 4096, (*hashes[:6], 100, 101), decode_here=False, output_len=2)
    warm = run(e)[0].time - cold
    assert warm == pytest.approx(COST.prefill_ms(6 * 512, 4096) / 1e3)
    assert warm < cold / 2
    assert e.cached_tokens == 6 * 512 and e.prompt_tokens == 2 * 4096


def test_incoming_handoff_waits_for_kv_room() -> None:
    e = SimEngine(COST)
    e.capacity = 10_000
    e.submit_prefill(0.0, 1, 6000, (), decode_here=True, output_len=50)
    events = run(e, until=0.0)
    e.request_admission(0.0, 2, 6000, 10, ())
    events += e.advance(0.0)
    assert EventKind.ADMITTED not in kinds(events, 2)  # 6000 + 6000 > 10000
    events += run(e)
    assert kinds(events, 2) == [EventKind.ADMITTED]
    admitted = next(ev.time for ev in events if ev.rid == 2)
    finished_1 = next(ev.time for ev in events if ev.rid == 1 and ev.kind == EventKind.FINISHED)
    assert admitted == pytest.approx(finished_1)
    e.join(admitted + 0.1, 2)
    events = run(e)
    assert kinds(events, 2) == [EventKind.FINISHED]
    assert e.idle


def test_kv_full_preempts_the_newest_and_recomputes_it() -> None:
    e = SimEngine(COST)
    e.capacity = 5000
    e.submit_prefill(0.0, 1, 2000, (), decode_here=True, output_len=1200)
    e.submit_prefill(0.0, 2, 2000, (), decode_here=True, output_len=1200)
    events = run(e)
    assert e.preemptions >= 1
    assert EventKind.PREEMPTED in kinds(events, 2)
    # Both still finish, exactly once.
    assert [ev.rid for ev in events if ev.kind == EventKind.FINISHED].count(1) == 1
    assert [ev.rid for ev in events if ev.kind == EventKind.FINISHED].count(2) == 1
    assert e.idle


def test_a_recompute_admitted_while_a_prompt_runs_is_not_lost() -> None:
    e = SimEngine(COST)
    e.capacity = 1000
    e.submit_prefill(0.0, 1, 400, (), decode_here=False, output_len=2)  # its KV held until released
    e.submit_prefill(0.0, 2, 200, (), decode_here=True, output_len=150)
    e.submit_prefill(0.0, 3, 200, (), decode_here=True, output_len=150)
    events: list = []
    while EventKind.PREEMPTED not in kinds(events, 3):
        events += e.advance(e.next_event_time())
    t = events[-1].time
    e.submit_prefill(t, 4, 100, (), decode_here=True, output_len=5)
    # Freeing the handoff's KV while request 4's prefill runs re-admits request 3 in front of it.
    e.release(t, 1)
    events += run(e)
    assert kinds(events, 4) == [EventKind.PREFILL_DONE, EventKind.FINISHED]
    assert kinds(events, 3) == [EventKind.PREFILL_DONE, EventKind.PREEMPTED, EventKind.FINISHED]
    assert e.idle


def test_prefill_is_chunked_while_sequences_decode() -> None:
    chunked = SimEngine(COST, EngineParams(chunk_tokens=256))
    chunked.submit_prefill(0.0, 1, 100, (), decode_here=True, output_len=2000)
    run(chunked, until=0.5)
    t = 0.5
    chunked.submit_prefill(t, 2, 4096, (), decode_here=False, output_len=2)
    events = run(chunked)
    done = next(ev.time for ev in events if ev.rid == 2)
    # 16 chunks, each also carrying a decode step: slower than one pass, faster than 16 + decode steps alone.
    assert done - t > COST.prefill_ms(0, 4096) / 1e3
    assert EventKind.FINISHED in kinds(events, 1)


def test_request_larger_than_the_node_is_dropped() -> None:
    e = SimEngine(COST)
    e.capacity = 1000
    e.request_admission(0.0, 9, 5000, 10, ())
    assert kinds(e.advance(0.0), 9) == [EventKind.DROPPED]


def test_watermark_fires_when_the_context_reaches_it() -> None:
    e = SimEngine(COST)
    e.submit_prefill(0.0, 1, 1000, (), decode_here=True, output_len=500)
    e.set_watermark(0.0, 1, 1100)  # before it joins the batch: applied when it does
    events = run(e)
    mark = next(ev for ev in events if ev.kind == EventKind.WATERMARK)
    first = events[0].time
    assert mark.time - first == pytest.approx(
        sum(COST.decode_step_ms(1, 1000 + k) for k in range(100)) / 1e3, rel=0.01
    )


def test_random_workload_conserves_requests_and_is_deterministic() -> None:
    def workload() -> list:
        rng = np.random.default_rng(42)
        e = SimEngine(CostModel("a100", 4), EngineParams(chunk_tokens=512, prefix_block_tokens=64))
        e.capacity = 60_000
        events: list = []
        t = 0.0
        for rid in range(120):
            t += float(rng.exponential(0.3))
            events += e.advance(t)
            prompt = int(rng.integers(100, 6000))
            hashes = tuple(int(h) for h in rng.integers(1, 20, size=prompt // 64))
            e.submit_prefill(t, rid, prompt, hashes, decode_here=True, output_len=int(rng.integers(1, 400)))
        events += run(e)
        return events

    events = workload()
    finished = [ev.rid for ev in events if ev.kind == EventKind.FINISHED]
    assert sorted(finished) == list(range(120))
    assert sorted(ev.rid for ev in events if ev.kind == EventKind.PREFILL_DONE) == list(range(120))
    assert [ev.time for ev in events] == sorted(ev.time for ev in events)
    assert events == workload()


def test_the_engine_counts_the_tokens_it_decoded() -> None:
    """What a worker reports as decoded: one token per sequence per step, none for a prefill."""

    def engine() -> SimEngine:
        e = SimEngine(COST)
        e.submit_prefill(0.0, 1, 1000, (), decode_here=True, output_len=101)
        e.submit_prefill(0.0, 2, 500, (), decode_here=True, output_len=31)
        e.submit_prefill(0.0, 3, 800, (), decode_here=False, output_len=50)  # prefilled for elsewhere
        return e

    e = engine()
    end = run(e)[-1].time
    assert e.generated_at(end) == 100 + 30
    counts = []
    for share in (0.25, 0.5, 0.75):  # between events too (the batch decodes fluidly)
        e = engine()
        run(e, until=end * share)
        counts.append(e.generated_at(end * share))
    assert 0 < counts[0] < counts[1] < counts[2] < 130
