"""The local cluster's supervisor: dead children come back, with back-off while they keep dying."""

from __future__ import annotations

from pdorch.supervisor import Supervisor


class Proc:
    def __init__(self) -> None:
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_dead_child_is_restarted_after_its_back_off_which_grows_and_resets() -> None:
    clock, procs, started, said = Clock(), {"decode-0": Proc(), "prefill-0": Proc()}, [], []

    def restart(name: str) -> None:
        started.append((clock.now, name))
        procs[name] = Proc()

    sup = Supervisor(restart, initial_s=1.0, max_s=4.0, stable_s=10.0, clock=clock, say=said.append)
    sup.check(procs)
    procs["decode-0"].returncode = -9
    for step in range(1, 80):  # crashes right after every start for a while
        clock.now = step * 0.25
        sup.check(procs)
        if started and started[-1][0] == clock.now and len(started) < 4:
            procs["decode-0"].returncode = 1
    # Each death is noticed on the next check (0.25 s later), then waits 1 s, 2 s, 4 s, 4 s (capped).
    assert [t for t, _ in started[:4]] == [1.25, 3.5, 7.75, 12.0]
    assert {name for _, name in started} == {"decode-0"}  # the healthy one is left alone
    assert "decode-0 exited with -9; restarting it in 1.0s" in said
    assert sup.restarts("decode-0") == 4 and sup.restarts("prefill-0") == 0
    # Up for longer than stable_s: the next crash is restarted after initial_s again.
    clock.now = 40.0
    sup.check(procs)
    procs["decode-0"].returncode = -9
    sup.check(procs)
    clock.now = 41.0
    sup.check(procs)
    assert started[-1] == (41.0, "decode-0")
