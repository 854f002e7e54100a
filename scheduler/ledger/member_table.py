"""The decoding requests of one node as columns, so that the tightest of them is found in one pass.

Placement asks for a node's tightest member (the one with the least delay left to absorb and keep
its TPOT objective) whenever the node's ledger has changed, which under load is nearly every
decision, and a decode node holds hundreds of members: numpy over columns costs about as much as
~25 members did one at a time in Python. The answer is kept until the members or the step change
(most of a node's bookings touch neither), and there is nothing to compute while no member has an
objective. Rows keep the order the members were added in (removal leaves a hole, compacted in
order now and then), so ties go to the earliest member.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

_FIELDS = ("steps", "tpot", "delay", "joined", "at_join")


class MemberRow(NamedTuple):
    tpot_slo_s: float  # 0 = no objective
    joined_at: float | None  # when its decode began here (None: not yet)
    delay_s: float  # time between its first token and that (the KV handoff)


class MemberTable:
    def __init__(self, capacity: int = 16) -> None:
        self._rows: dict[str, int] = {}
        self._used = 0  # rows handed out, live or not
        self._cols = {name: np.full(capacity, math.nan) for name in _FIELDS}
        self._with_objective = 0  # live rows with steps to decode and a TPOT objective
        self._version = 0
        self._last: tuple[tuple[int, float, float, float], tuple[float, int, float]] | None = None

    def add(self, job_id: str, steps: int, tpot_slo_s: float) -> None:
        """A member predicted to decode ``steps`` steps with this objective (0: none); one added
        again keeps its place, as in a dict."""
        row = self._rows.get(job_id)
        if row is None:
            if self._used == len(self._cols["steps"]):
                self._grow()
            row = self._rows[job_id] = self._used
            self._used += 1
        else:
            self._with_objective -= self._has_objective(row)
        for name, value in zip(_FIELDS, (steps, tpot_slo_s, 0.0, math.nan, math.nan), strict=True):
            self._cols[name][row] = value
        self._with_objective += self._has_objective(row)
        self._version += 1

    def join(self, job_id: str, joined_at: float, delay_s: float) -> None:
        row = self._rows[job_id]
        self._cols["joined"][row] = joined_at
        self._cols["delay"][row] = delay_s
        self._version += 1

    def count_steps(self, start: float, per_step: float, steps_done: float) -> None:
        """The node decoded from ``start`` at ``per_step`` seconds a step, its count ``steps_done``
        at ``start``: a member that joined since starts counting from its share of those steps."""
        n = self._used
        joined, at_join = self._cols["joined"][:n], self._cols["at_join"][:n]
        new = ~np.isnan(joined) & np.isnan(at_join)
        if new.any():
            at_join[new] = steps_done + np.maximum(0.0, joined[new] - start) / per_step
            self._version += 1

    def row(self, job_id: str) -> MemberRow:
        """A member's objective, join time and handoff delay (KeyError if it is not one)."""
        i = self._rows[job_id]
        joined = float(self._cols["joined"][i])
        return MemberRow(
            float(self._cols["tpot"][i]),
            None if math.isnan(joined) else joined,
            float(self._cols["delay"][i]),
        )

    def remove(self, job_id: str) -> None:
        row = self._rows.pop(job_id, None)
        if row is None:
            return
        self._with_objective -= self._has_objective(row)
        self._cols["tpot"][row] = math.nan  # no objective: never the tightest
        self._version += 1
        if len(self._rows) * 2 < self._used and self._used > 64:
            self._compact()

    def tightest(self, step_s: float, steps_done: float, steps_at: float) -> tuple[float, int, float]:
        """The least delay any member with an objective can still absorb (``inf`` if none can, or
        none has one), over how many steps, and its objective; if each remaining step takes
        ``step_s`` and the node has taken ``steps_done`` steps by ``steps_at``.

        A member's budget is its objective times the steps it has decoded and will decode, less
        the time those it has decoded took (counted from the node's step count since it joined:
        every stall and slow step is in it), its handoff delay and the rest at ``step_s``. One that
        outlives its predicted steps keeps the slack it built (at least one step left); one already
        past saving is not protected."""
        if not self._with_objective:
            return math.inf, 0, 0.0
        key = (self._version, step_s, steps_done, steps_at)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        n = self._used
        c = {name: col[:n] for name, col in self._cols.items()}
        known = ~(np.isnan(c["joined"]) | np.isnan(c["at_join"]))
        done = np.where(known, np.maximum(0.0, steps_done - c["at_join"]), 0.0)
        elapsed = np.where(known, np.maximum(0.0, steps_at - c["joined"]), 0.0)
        rest = np.maximum(0.0, c["steps"] - done)
        left = (done + rest) * c["tpot"] - c["delay"] - elapsed - rest * step_s
        ok = (c["steps"] >= 1) & (c["tpot"] > 0) & (left >= 0)
        found: tuple[float, int, float] = (math.inf, 0, 0.0)
        if ok.any():
            i = int(np.argmin(np.where(ok, left, math.inf)))
            found = (float(left[i]), max(1, round(float(rest[i]))), float(c["tpot"][i]))
        self._last = (key, found)
        return found

    def __len__(self) -> int:
        return len(self._rows)

    def _has_objective(self, row: int) -> bool:
        return bool(self._cols["steps"][row] >= 1 and self._cols["tpot"][row] > 0)

    def _grow(self) -> None:
        for name, col in self._cols.items():
            wider = np.full(2 * len(col), math.nan)
            wider[: len(col)] = col
            self._cols[name] = wider

    def _compact(self) -> None:
        order = sorted(self._rows.items(), key=lambda item: item[1])
        keep = np.fromiter((row for _, row in order), dtype=np.intp, count=len(order))
        for col in self._cols.values():
            col[: len(keep)] = col[keep]
            col[len(keep) :] = math.nan
        self._rows = {job: i for i, (job, _) in enumerate(order)}
        self._used = len(keep)
