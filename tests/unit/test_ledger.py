"""The reservation ledger: bookings, their lifecycle, the latency observations it derives, and the
node views built from it."""

from __future__ import annotations

import math
import random
from collections import OrderedDict

import pytest

from scheduler.ledger.ledger import BookingFacts, Ledger
from scheduler.ledger.node_ledger import PREFILL_RATE_HORIZON_S, NodeLedger
from scheduler.ledger.prefix_memory import PrefixMemory, StalePrefixView
from scheduler.node_view import NodeState, node_view
from scheduler.placement.config import default_accelerators
from scheduler.placement.kv_budget import outstanding_blocks
from scheduler.placement.latency_model import (
    ClassLatency,
    LatencyTable,
    LinearModel,
    class_key,
    prefill_x,
    prompt_work,
)
from scheduler.placement.prefix import matched_prefix_blocks
from scheduler.placement.types import Placement
from transport.messages import Hello, Load, Role

KV = 1000  # bytes per token


def ledger() -> Ledger:
    led = Ledger()
    for wid, acc in (("p", "h100"), ("d", "a100")):
        led.add_node(wid, "m", acc, block_size=16, kv_bytes_per_token=KV, capacity_tokens=1600)
    return led


def facts(
    prompt: int = 160, steps: int = 10, tpot: float = 0.1, hashes: tuple[int, ...] = ()
) -> BookingFacts:
    return BookingFacts(prompt, hashes, 16, decode_steps=steps, tpot_slo_s=tpot)


def test_a_split_booking_moves_through_its_lifecycle() -> None:
    led = ledger()
    p, d = led.node("p"), led.node("d")
    assert p is not None and d is not None
    led.book("j", Placement("p", "d", reserve_blocks=20), facts(hashes=(7, 8)), cached=32, now=1.0)
    # Reserve on d (nothing of it there yet), the prompt queued on p (less what p should have cached).
    assert (d.reserved_blocks, p.reserved_blocks) == (20, 0)
    assert p.pending_tokens == 160 - 32 and set(p.held) == set(d.held) == {"j"}
    assert 7 in p.prefixes.view() and 8 in d.prefixes.view()
    sample = led.first_token("j", now=1.5, cached=64)  # the engine says 64 were cached
    assert sample is not None and (sample.uncached, sample.cached, sample.seconds) == (96, 64, 0.5)
    assert (sample.model, sample.accelerator) == ("m", "h100") and p.pending_tokens == 0
    handoff = led.kv_loaded("j", now=1.75)
    assert handoff is not None and handoff.seconds == 0.25 and handoff.kv_bytes == 160 * KV
    assert not p.held  # the prefill side holds nothing more
    assert d.reserved_blocks == 20 - 10  # the prompt's 10 blocks are now backed by the worker's used ones
    # 10 steps in 1.0 s after a 0.25 s handoff: its TPOT counts from the first token, 0.125 > 0.1.
    outcome = led.finish("j", now=2.75, steps=10)
    assert outcome is not None and (outcome.model, outcome.accelerator, outcome.met) == ("m", "a100", False)
    assert not d.held and not d.members and led.booking("j") is None


def test_a_finish_tells_whether_the_tpot_objective_was_met_and_none_without_one() -> None:
    led = ledger()
    for job, tpot in (("met", 0.1), ("none", 0.0)):
        led.book(job, Placement("p", "d", 20), facts(tpot=tpot), cached=0, now=0.0)
        led.first_token(job, now=1.0)
        led.kv_loaded(job, now=1.0)
    met = led.finish("met", now=2.0, steps=10)
    assert met is not None and met.met
    assert led.finish("none", now=9.0, steps=10) is None


def test_prefill_time_is_measured_from_when_the_node_could_start() -> None:
    """A prompt queued behind another starts when that one answers (engines prefill in order)."""
    led = ledger()
    led.book("a", Placement("p", "d", 1), facts(), cached=0, now=0.0)
    led.book("b", Placement("p", "d", 1), facts(), cached=0, now=0.1)
    first = led.first_token("a", now=1.0)
    second = led.first_token("b", now=1.6)
    assert first is not None and first.seconds == 1.0
    assert second is not None and second.seconds == pytest.approx(0.6)
    # Answered out of order: the other was not done, so this one's own time is unknown.
    led.book("c", Placement("p", "d", 1), facts(), cached=0, now=2.0)
    led.book("e", Placement("p", "d", 1), facts(), cached=0, now=2.0)
    assert led.first_token("e", now=3.0) is None
    # Every answered prompt counts as prefilled there, timed or not.
    assert led.node("p").prefilled_tokens == 3 * 160  # type: ignore[union-attr]


def test_a_decode_observation_averages_the_batch_and_counts_the_prefill_stalls() -> None:
    led = ledger()
    d = led.node("d")
    assert d is not None
    assert d.progress(0.0, decoded_tokens=0) is None  # the first call only sets the mark
    led.book("long", Placement("d", "d", 10), facts(prompt=100), cached=0, now=0.0)
    led.first_token("long", now=1.0)  # colocated: it decodes from its first token
    led.book("short", Placement("d", "d", 10), facts(prompt=300), cached=0, now=1.0)
    led.first_token("short", now=2.0)  # its prefill on d stalled "long" for a second
    led.finish("short", now=3.0, steps=5)
    # Batch 1 (0-1 s nothing, 1-2 s "long"), 2 (2-3 s), 1 (3-5 s): 1 + 2 + 2 = 5 member-seconds
    # over 5 s, in which the node reports 50 tokens decoded: 50 steps of an average batch of 1.
    sample = d.progress(5.0, decoded_tokens=50)
    assert sample is not None and (sample.model, sample.accelerator) == ("m", "a100")
    assert sample.seconds == 5.0 and sample.batch == pytest.approx(1.0) and sample.steps == 50
    assert sample.context == pytest.approx((100 * 1 + 400 * 1 + 100 * 2) / 5)
    assert sample.prefill_tokens == 100 + 300  # both prompts were prefilled on d meanwhile
    assert led.decode_steps() == {"d": pytest.approx(0.1)}  # exported per worker
    # The prefill rate placement sees: 80 tokens/s over this window, averaged in from 0.
    assert d.prefilling_tokens_per_s == pytest.approx(400 / 5 * -math.expm1(-5 / PREFILL_RATE_HORIZON_S))


def test_decode_observations_need_enough_steps_and_skip_a_restarted_counter() -> None:
    led = ledger()
    d = led.node("d")
    assert d is not None
    led.book("j", Placement("d", "d", 10), facts(), cached=0, now=0.0)
    led.first_token("j", now=0.0)
    d.progress(0.0, decoded_tokens=100)
    assert d.progress(1.0, decoded_tokens=103) is None  # 3 steps say little: kept accumulating
    sample = d.progress(2.0, decoded_tokens=120)
    assert sample is not None and (sample.steps, sample.seconds) == (20, 2.0)
    assert d.progress(3.0, decoded_tokens=5) is None  # the worker restarted: its counter too
    sample = d.progress(4.0, decoded_tokens=25)
    assert sample is not None and (sample.steps, sample.seconds) == (20, 1.0)


def test_release_is_idempotent_and_a_dropped_node_reports_its_jobs() -> None:
    led = ledger()
    led.book("j", Placement("p", "d", 5), facts(), cached=0, now=0.0)
    led.release("j", now=0.5, worker_id="d")
    assert not led.node("d").held and "j" in led.node("p").held  # type: ignore[union-attr]
    assert led.drop_node("p") == ["j"]
    led.release("j", now=0.6)
    led.release("j", now=0.7)
    assert led.booking("j") is None and led.node("p") is None


# ---------------------------------------------------------------------------------------- views

TABLE = LatencyTable(
    classes={
        class_key("m", "h100"): ClassLatency(
            LinearModel((0.0, 1.0, 0.0, 0.0, 0.0, 0.0)), LinearModel((0.02, 0.0, 0.0, 1.0))
        ),
        class_key("m", "a100"): ClassLatency(
            LinearModel((0.0, 1.0, 0.0, 0.0, 0.0, 0.0)), LinearModel((0.05, 0.0, 0.0, 1.0))
        ),
    },
    version=1,
)


def state(wid: str, role: Role, accelerator: str, load: Load | None = None) -> NodeState:
    hello = Hello(1, wid, role, "sim", "m", KV, 16, 1000, accelerator=accelerator)
    return NodeState(hello, load or Load())


def view(led: Ledger, wid: str, now: float, load: Load | None = None):  # type: ignore[no-untyped-def]
    role, acc = (Role.PREFILL, "h100") if wid == "p" else (Role.DECODE, "a100")
    node = led.node(wid)
    assert node is not None
    return node_view(state(wid, role, acc, load), node, TABLE, default_accelerators(), now)


def test_the_prefill_backlog_is_the_learnt_time_of_what_is_queued_less_what_the_head_has_run() -> None:
    led = ledger()
    # 1 s per 1k uncached tokens: two prompts of 1,000 and 500 tokens queued at t=0.
    led.book("a", Placement("p", "d", 1), facts(prompt=1000), cached=0, now=0.0)
    led.book("b", Placement("p", "d", 1), facts(prompt=500), cached=0, now=0.0)
    assert view(led, "p", now=0.0).prefill_wait_s == pytest.approx(1.5)
    assert view(led, "p", now=0.4).prefill_wait_s == pytest.approx(1.1)
    led.first_token("a", now=1.0)
    assert view(led, "p", now=1.2).prefill_wait_s == pytest.approx(0.3)
    # A worker reporting more queued work than the ledger knows of wins (e.g. another scheduler's).
    busy = Load(queued_prefill_tokens=4000)
    assert view(led, "p", now=1.2, load=busy).prefill_wait_s == pytest.approx(4.0, rel=0.02)


def test_the_tightest_decoding_request_sets_the_node_tolerance() -> None:
    led = ledger()
    # The a100 decode step is 50 ms whatever the batch (its batch coefficient is 0 here).
    led.book("loose", Placement("d", "d", 1), facts(steps=100, tpot=0.1), cached=0, now=0.0)
    led.book("tight", Placement("p", "d", 1), facts(steps=10, tpot=0.1), cached=0, now=0.0)
    led.first_token("loose", now=0.2)
    led.first_token("tight", now=0.2)
    led.kv_loaded("tight", now=0.3)  # a 0.1 s handoff
    v = view(led, "d", now=0.3)
    # tight: 10 x (0.1 - 0.05) - 0.1 handoff = 0.4 s left over 10 steps; loose: 100 x 0.05 = 5 s.
    assert (v.stall_tolerance_s, v.tolerance_steps, v.tolerance_tpot_s) == pytest.approx((0.4, 10, 0.1))
    assert v.decode_batch == 2 and v.decode_context_tokens == 320
    # A local prefill queued on d will stall them: it comes off the tolerance (0.16 s at 1 s/1k).
    led.book("local", Placement("d", "d", 1), facts(prompt=160, steps=0), cached=0, now=0.3)
    assert view(led, "d", now=0.3).stall_tolerance_s == pytest.approx(0.4 - 0.16)
    # A request already past saving (negative tolerance) is not protected.
    led.book("lost", Placement("p", "d", 1), facts(steps=2, tpot=0.1), cached=0, now=0.3)
    led.first_token("lost", now=0.4)
    led.kv_loaded("lost", now=1.4)  # a one-second handoff: 2 x 0.05 - 1 < 0
    assert view(led, "d", now=1.4).tolerance_steps == 10


def test_a_members_tolerance_counts_the_steps_it_has_decoded_and_the_time_they_took() -> None:
    led = ledger()
    d = led.node("d")
    assert d is not None
    d.progress(0.0, decoded_tokens=0)
    led.book("early", Placement("d", "d", 1), facts(prompt=100, steps=10, tpot=0.1), cached=0, now=0.0)
    led.first_token("early", now=0.0)  # colocated: it decodes from its first token
    # Before any decode observation: its 10 predicted steps at the model's 50 ms step.
    assert view(led, "d", now=0.5).stall_tolerance_s == pytest.approx(10 * (0.1 - 0.05))
    led.book("late", Placement("d", "d", 1), facts(prompt=100, steps=100, tpot=0.1), cached=0, now=1.0)
    led.first_token("late", now=1.0)
    # 0-1 s batch 1, 1-2 s batch 2: 3 member-seconds, 60 tokens: 40 steps of 50 ms.
    sample = d.progress(2.0, decoded_tokens=60)
    assert sample is not None and sample.steps == 40
    v = view(led, "d", now=2.0)
    # early outlived its 10 predicted steps: 40 steps in 2 s kept 40 x 0.1 - 2 = 2 s of slack, over
    # one more step; late joined halfway (20 steps in 1 s) with 80 to go: 100 x 0.1 - 1 - 80 x 0.05.
    assert (v.stall_tolerance_s, v.tolerance_steps) == pytest.approx((2.0, 1))
    led.finish("early", now=2.0, steps=40)
    v = view(led, "d", now=2.0)
    assert (v.stall_tolerance_s, v.tolerance_steps) == pytest.approx((100 * 0.1 - 1.0 - 80 * 0.05, 80))
    # Steps that ran slow (prefills stalled them) use up its slack: 10 steps in 2 s.
    d.progress(4.0, decoded_tokens=70)
    assert view(led, "d", now=4.0).stall_tolerance_s == pytest.approx(100 * 0.1 - 3.0 - 70 * 0.05)


def test_views_are_rebuilt_only_when_something_they_show_changed() -> None:
    led = ledger()
    load = Load(blocks_used=3)
    first = view(led, "d", now=0.0, load=load)
    assert view(led, "d", now=5.0, load=load) is first  # nothing queued: time changes nothing
    assert view(led, "d", now=5.0, load=Load(blocks_used=4)) is not first
    led.book("j", Placement("p", "d", 4), facts(), cached=0, now=5.0)
    assert view(led, "d", now=5.0, load=load).blocks_reserved == 4
    assert math.isinf(view(led, "p", now=5.0).stall_tolerance_s)


def test_a_prefix_view_never_shows_newer_contents() -> None:
    memory = PrefixMemory(capacity_tokens=32)  # two blocks of 16
    memory.add((1, 2))
    seen = memory.view()
    assert 1 in seen and len(seen) == 2
    memory.add((3,))  # evicts 1
    with pytest.raises(StalePrefixView):
        _ = 1 in seen
    assert 1 not in memory.view() and set(memory.view()) == {2, 3}
    stale = memory.view()
    memory.add((4,))
    with pytest.raises(StalePrefixView):
        matched_prefix_blocks((3, 4), stale)


def test_a_prefix_memory_keeps_the_order_and_bound_of_moving_each_hash_to_the_end() -> None:
    rng = random.Random(7)
    memory, reference = PrefixMemory(capacity_tokens=16 * 40), OrderedDict[int, None]()
    for _ in range(300):
        # Prompts sharing prefixes, some hashes repeated within one call.
        hashes = [rng.randrange(60) for _ in range(rng.randrange(0, 25))]
        memory.add(hashes)
        for h in hashes:
            reference[h] = None
            reference.move_to_end(h)
        while len(reference) > 40:
            reference.popitem(last=False)
        assert list(memory.view()) == list(reference)
        prompt = [rng.randrange(60) for _ in range(10)]
        want = next((i for i, h in enumerate(prompt) if h not in reference), len(prompt))
        assert matched_prefix_blocks(prompt, memory.view()) == want
        assert matched_prefix_blocks(prompt, set(reference)) == want


def test_a_view_shows_the_prefill_rate_as_it_changes_even_with_nothing_decoding() -> None:
    led = ledger()
    p = led.node("p")
    assert p is not None
    load = Load()
    p.progress(0.0, decoded_tokens=0)
    led.book("a", Placement("p", "d", 1), facts(prompt=1000), cached=0, now=0.0)
    led.first_token("a", now=0.5)
    p.progress(1.0, decoded_tokens=0)
    first = view(led, "p", now=1.0, load=load).prefilling_tokens_per_s
    assert first == pytest.approx(1000.0 * -math.expm1(-1 / PREFILL_RATE_HORIZON_S))
    p.progress(2.0, decoded_tokens=0)  # nothing prefilled since: the same load, a new rate
    assert view(led, "p", now=2.0, load=load).prefilling_tokens_per_s == pytest.approx(
        first * math.exp(-1 / PREFILL_RATE_HORIZON_S)
    )


def test_the_prefill_rate_is_the_mean_of_bursty_windows_not_the_last_one() -> None:
    # A node that prefills a 2,000-token prompt every other second: each one-second window sees
    # 2,000 tokens/s or none, and a request decoding there for many windows sees 1,000 on average.
    led = ledger()
    d = led.node("d")
    assert d is not None
    d.progress(0.0, decoded_tokens=0)
    rates = []
    for second in range(1, 61):
        if second % 2:
            led.book(f"j{second}", Placement("d", "d", 1), facts(prompt=2000), cached=0, now=second - 0.9)
            led.first_token(f"j{second}", now=second - 0.5)
            led.finish(f"j{second}", now=second - 0.4, steps=0)
        d.progress(float(second), decoded_tokens=0)
        rates.append(d.prefilling_tokens_per_s)
    # After a burst window and after an empty one alike, the rate is near the mean.
    assert all(600.0 < r < 1400.0 for r in rates[-10:])


def test_the_reserved_and_queued_totals_follow_every_change_to_the_jobs() -> None:
    """Kept up to date as jobs change (placement reads them for every node on every decision):
    after any sequence of bookings, answers, growth and releases they equal the sums over the jobs."""
    rng = random.Random(7)
    node = NodeLedger("d", "m", "a100", block_size=16, kv_bytes_per_token=1, capacity_tokens=1 << 20)
    jobs = [f"j{i}" for i in range(12)]
    now = 0.0
    for _ in range(3000):
        now += 0.01
        job = rng.choice(jobs)
        op = rng.randrange(6)
        if op == 0:
            node.hold(job, rng.randrange(0, 40))
        elif op == 1:
            tokens = rng.randrange(1, 900)
            node.send_prefill(job, tokens, rng.randrange(0, tokens), now)
        elif op == 2:
            node.answer_prefill(job, now, rng.choice([None, rng.randrange(0, 300)]))
        elif op == 3:
            if job not in node.members:
                node.add_member(job, rng.randrange(1, 500), 8, 0.05)
            node.join(job, now, 0.01, rng.randrange(0, 800))
        elif op == 4:
            node.grow(job, rng.randrange(0, 900), rng.choice([None, rng.randrange(0, 60)]))
        else:
            node.release(job, now)
        held = node.held.values()
        assert node.reserved_blocks == sum(outstanding_blocks(h.reserved_blocks, h.tokens, 16) for h in held)
        assert node.pending_tokens == sum(p.tokens - p.cached for p in node.pending.values())
        # The queue's prefill work, from which its learnt time is predicted in one product.
        works = [prompt_work(p.tokens - p.cached, p.cached) for p in node.pending.values()]
        assert node.pending_work == pytest.approx(tuple(map(sum, zip(*works, strict=True))) or (0.0,) * 3)
        if not node.pending:
            assert node.pending_work == (0.0, 0.0, 0.0)  # exactly: no residue accumulates


def test_a_queue_predicted_in_one_product_is_the_sum_of_its_prompts_predictions() -> None:
    """Every prefill feature is linear in the prompts' work and every coefficient >= 0, so the
    node's backlog (one prediction over its summed work) equals the per-prompt sum."""
    rng = random.Random(3)
    model = LinearModel(tuple(rng.uniform(0.0, 0.5) for _ in range(6)))
    table = LatencyTable(
        classes={class_key("m", "h100"): ClassLatency(model, LinearModel((0.0,) * 4))}, version=1
    )
    led = ledger()
    prompts = [(rng.randrange(1, 9000), rng.randrange(0, 4000)) for _ in range(40)]
    for i, (tokens, cached) in enumerate(prompts):
        decode = "p" if i % 4 == 0 else "d"  # some decode on the prefill node: a batch there too
        led.book(f"j{i}", Placement("p", decode, 1), facts(prompt=tokens), cached=cached, now=0.0)
    node = led.node("p")
    assert node is not None
    batch, context = len(node.members), node.booked_tokens
    assert batch and context
    want = sum(
        model.predict(prefill_x(p.tokens - p.cached, p.cached, batch, context)) for p in node.pending.values()
    )
    got = node_view(state("p", Role.PREFILL, "h100"), node, table, default_accelerators(), 0.0)
    assert got.prefill_wait_s == pytest.approx(want, rel=1e-9)


def test_a_node_turning_handoffs_away_or_failing_them_is_shown_so_while_it_lasts() -> None:
    led = ledger()
    node = led.node("d")
    assert node is not None
    assert not view(led, "d", 10.0).kv_refusing
    node.kv_busy(10.0, 5.0)
    assert view(led, "d", 14.9).kv_refusing
    assert not view(led, "d", 15.1).kv_refusing
    node.kv_path.failed(20.0, 19.0, 5.0, 60.0)
    got = view(led, "d", 24.9)
    assert got.kv_unreachable and not got.kv_refusing
    assert not view(led, "d", 25.1).kv_unreachable


def cluster_of(*workers: str) -> Ledger:
    led = Ledger()
    for wid in workers:
        led.add_node(wid, "m", "a100", block_size=16, kv_bytes_per_token=KV, capacity_tokens=1600)
    return led


def test_one_pair_failing_backs_off_the_pair_and_not_its_nodes() -> None:
    led = cluster_of("p0", "p1", "d0", "d1")
    d0 = led.node("d0")
    assert d0 is not None
    assert led.kv_handoff_failed("p0", "d0", 10.0, 0.0, 5.0, 60.0) == [(("p0", "d0"), 5.0)]
    assert d0.kv_unreachable_from(14.9) == {"p0"} and not d0.kv_unreachable_from(15.0)
    assert not any(n.kv_path.open(11.0) for n in map(led.node, ("p0", "p1", "d0", "d1")) if n)
    # Shown to placement on the receiving node's view, as the senders it does not take KV from.
    assert view_of(led, "d0", 11.0).kv_unreachable_from == {"p0"}
    # The same pair failing again within its window: the same outage, nothing more backs off.
    assert led.kv_handoff_failed("p0", "d0", 12.0, 11.0, 5.0, 60.0) == []


def test_a_decode_node_failing_with_two_senders_has_its_own_kv_network_taken_as_down() -> None:
    led = cluster_of("p0", "p1", "d0", "d1")
    led.kv_handoff_failed("p0", "d0", 10.0, 0.0, 5.0, 60.0)
    got = led.kv_handoff_failed("p1", "d0", 11.0, 1.0, 5.0, 60.0)
    assert got == [(("p1", "d0"), 5.0), (("d0",), 5.0)]
    assert view_of(led, "d0", 12.0).kv_unreachable
    assert not view_of(led, "p0", 12.0).kv_unreachable and not view_of(led, "p1", 12.0).kv_unreachable


def test_a_prefill_node_failing_with_two_receivers_has_its_own_kv_network_taken_as_down() -> None:
    led = cluster_of("p0", "p1", "d0", "d1")
    led.kv_handoff_failed("p0", "d0", 10.0, 0.0, 5.0, 60.0)
    got = led.kv_handoff_failed("p0", "d1", 11.0, 1.0, 5.0, 60.0)
    assert got == [(("p0", "d1"), 5.0), (("p0",), 5.0)]
    # The sender is at fault: the receivers stay placeable (only the pairs back off).
    assert view_of(led, "p0", 12.0).kv_unreachable
    assert not view_of(led, "d0", 12.0).kv_unreachable and not view_of(led, "d1", 12.0).kv_unreachable
    # Once the windows are over, failures of pairs whose windows have closed count alone again.
    assert led.kv_handoff_failed("p1", "d0", 20.0, 19.0, 5.0, 60.0) == [(("p1", "d0"), 5.0)]


def test_whether_a_handoff_would_go_over_a_kv_path_that_backs_off() -> None:
    led = cluster_of("p0", "p1", "d0", "d1")
    assert not led.kv_path_backs_off("p0", "d0", 10.0)
    led.kv_handoff_failed("p0", "d0", 10.0, 0.0, 5.0, 60.0)
    assert led.kv_path_backs_off("p0", "d0", 11.0)  # the pair
    assert not any(led.kv_path_backs_off(p, d, 11.0) for p, d in (("p1", "d0"), ("p0", "d1"), ("p1", "d1")))
    assert not led.kv_path_backs_off("p0", "d0", 15.0)  # its window is over
    led.kv_handoff_failed("p0", "d1", 16.0, 15.0, 5.0, 60.0)
    led.kv_handoff_failed("p0", "d0", 16.0, 15.0, 5.0, 60.0)
    # p0 failing with two receivers: every handoff from it, to either node.
    assert led.kv_path_backs_off("p0", "d1", 17.0) and led.kv_path_backs_off("p0", "d0", 17.0)
    assert not led.kv_path_backs_off("p1", "d1", 17.0)
    assert not led.kv_path_backs_off("gone", "d1", 17.0) and not led.kv_path_backs_off("p1", "gone", 17.0)


def test_a_landed_handoff_starts_the_pair_and_both_nodes_afresh() -> None:
    led = cluster_of("p0", "d0", "d1")
    led.kv_handoff_failed("p0", "d0", 10.0, 0.0, 5.0, 60.0)
    led.kv_handoff_failed("p0", "d1", 11.0, 1.0, 5.0, 60.0)
    assert led.kv_handoff_failed("p0", "d0", 20.0, 19.0, 5.0, 60.0) == [(("p0", "d0"), 10.0)]
    led.kv_handoff_landed("p0", "d0", 40.0)
    d0, p0 = led.node("d0"), led.node("p0")
    assert d0 is not None and p0 is not None
    assert "p0" not in d0.kv_from and p0.kv_path.failures == 0 and d0.kv_path.failures == 0
    assert led.kv_handoff_failed("p0", "d0", 50.0, 49.0, 5.0, 60.0) == [(("p0", "d0"), 5.0)]


def test_a_node_that_leaves_takes_its_pairs_with_it() -> None:
    led = cluster_of("p0", "d0")
    led.kv_handoff_failed("p0", "d0", 10.0, 0.0, 5.0, 60.0)
    led.drop_node("p0")
    d0 = led.node("d0")
    assert d0 is not None and not d0.kv_from  # bounded by the nodes present, whatever the churn


def view_of(led: Ledger, wid: str, now: float):  # type: ignore[no-untyped-def]
    role = Role.PREFILL if wid.startswith("p") else Role.DECODE
    node = led.node(wid)
    assert node is not None
    return node_view(state(wid, role, "a100"), node, TABLE, default_accelerators(), now)
