"""The back-off window shared by the KV broker's breaker and each decode worker's KV path."""

from __future__ import annotations

from scheduler.backoff import Backoff


def test_a_path_that_keeps_failing_is_left_alone_longer_each_time_until_it_succeeds() -> None:
    w = Backoff()
    assert not w.open(0.0)
    assert w.failed(100.0, began_at=99.0, base_s=5.0, max_s=60.0) == 5.0
    assert w.open(104.9) and not w.open(105.0)
    # Each later outage doubles it, up to the maximum.
    got = [w.failed(t, began_at=t - 1, base_s=5.0, max_s=60.0) for t in (200.0, 300.0, 400.0, 500.0, 600.0)]
    assert got == [10.0, 20.0, 40.0, 60.0, 60.0]
    w.succeeded()  # a success: the next outage starts afresh ...
    assert w.open(650.0)  # ... but the window it is in still runs its time
    assert w.failed(700.0, began_at=699.0, base_s=5.0, max_s=60.0) == 5.0
    assert w.failures == 1


def test_the_failures_of_one_outage_are_counted_once() -> None:
    w = Backoff()
    assert w.failed(10.0, began_at=0.0, base_s=5.0, max_s=60.0) == 5.0
    # Inside the window: the same outage (attempts placed before it was known).
    assert w.failed(12.0, began_at=11.0, base_s=5.0, max_s=60.0) is None
    # After the window, an attempt that began before it opened (it waited out its own timeout):
    # still the same outage, and it neither reopens the window nor doubles the next one.
    assert w.failed(18.0, began_at=8.0, base_s=5.0, max_s=60.0) is None
    assert not w.open(18.0) and w.failures == 1
    # An attempt begun after the window opened that fails: a new outage, twice as long.
    assert w.failed(20.0, began_at=15.5, base_s=5.0, max_s=60.0) == 10.0


def test_a_maximum_below_the_base_does_not_shorten_the_first_window() -> None:
    assert Backoff().failed(0.0, began_at=-1.0, base_s=5.0, max_s=1.0) == 5.0
