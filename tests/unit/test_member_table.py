"""The tightest member found over columns is the one a plain loop over the members finds."""

from __future__ import annotations

import math
import random

import pytest

from scheduler.ledger.member_table import MemberTable


def loop_tightest(members: dict, step: float, steps_done: float, steps_at: float) -> tuple[float, int, float]:
    """The definition, one member at a time, first in order winning ties."""
    best = (math.inf, 0, 0.0)
    for steps, tpot, joined, delay, at_join in members.values():
        if steps < 1 or tpot <= 0:
            continue
        done = elapsed = 0.0
        if joined is not None and at_join is not None:
            done = max(0.0, steps_done - at_join)
            elapsed = max(0.0, steps_at - joined)
        rest = max(0.0, steps - done)
        left = (done + rest) * tpot - delay - elapsed - rest * step
        if 0.0 <= left < best[0]:
            best = (left, max(1, round(rest)), tpot)
    return best


def test_the_tightest_member_is_the_loops_through_adds_joins_removals_and_compaction() -> None:
    rng = random.Random(3)
    table, members = MemberTable(capacity=2), {}
    steps_done, steps_at = 0.0, 0.0
    for i in range(4000):
        op = rng.random()
        job = f"j{rng.randrange(150)}"
        if op < 0.35:
            # Coarse values so that ties happen; some without an objective or steps.
            steps, tpot = rng.choice([0, 4, 8, 50, 200]), rng.choice([0.0, 0.05, 0.1])
            members[job] = (steps, tpot, None, 0.0, None)  # added again: keeps its place
            table.add(job, steps, tpot)
        elif op < 0.55 and job in members and members[job][2] is None:
            steps, tpot, _, _, _ = members[job]
            delay = rng.choice([0.0, 0.01, 0.2])
            members[job] = (steps, tpot, steps_at + rng.random(), delay, None)
            table.join(job, members[job][2], delay)
        elif op < 0.65:  # a decode observation: k steps since the last one
            k, start = rng.randrange(1, 20), steps_at
            steps_at += rng.random()
            per_step = (steps_at - start) / k
            for j, (steps, tpot, joined, delay, at_join) in members.items():
                if joined is not None and at_join is None:
                    at_join = steps_done + max(0.0, joined - start) / per_step
                    members[j] = (steps, tpot, joined, delay, at_join)
            table.count_steps(start, per_step, steps_done)
            steps_done += k
        elif op < 0.9:
            members.pop(job, None)
            table.remove(job)
        step = rng.choice([0.0, 0.01, 0.03, 0.08])
        want = loop_tightest(members, step, steps_done, steps_at)
        assert table.tightest(step, steps_done, steps_at) == want, i
        assert len(table) == len(members)


def test_a_kept_answer_is_dropped_when_a_member_changes_and_none_without_objectives() -> None:
    table = MemberTable()
    table.add("a", 10, 0.0)  # no objective
    table.add("b", 0, 0.05)  # nothing to decode
    assert table.tightest(0.01, 0.0, 0.0) == (math.inf, 0, 0.0)
    table.add("c", 10, 0.05)
    first = table.tightest(0.01, 0.0, 0.0)
    assert first == (pytest.approx(0.4), 10, 0.05)
    assert table.tightest(0.01, 0.0, 0.0) == first  # kept
    table.join("c", 0.0, 0.2)  # its handoff took 0.2 s: less left
    assert table.tightest(0.01, 0.0, 0.0)[0] == pytest.approx(first[0] - 0.2)
    table.remove("c")
    assert table.tightest(0.01, 0.0, 0.0) == (math.inf, 0, 0.0)
