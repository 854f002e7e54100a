"""Logging of what peers send wrong: the first line, then at most one per interval with a count."""

from __future__ import annotations

import logging

import pytest

from transport.rate_limited_log import RateLimitedLog


def test_a_flood_of_bad_input_logs_a_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("t"), interval_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "t"):
        for i in range(1000):
            now[0] = i * 0.01  # 1000 in 10 s
            limited("bad frame %d", i)
        now[0] = 10.5
        limited("bad frame %d", 1000)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["bad frame 0", "bad frame 1000 (and 999 more like it in the last 10s, not logged)"]
