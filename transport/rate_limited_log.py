"""Logging of what peers send wrong, at most one line per interval.

Malformed frames, refused handshakes and bad requests come at whatever rate a peer chooses; a line
for each would let garbage grow the logs without limit. The counts go to metrics or stats; the log
gets the first occurrence, then at most one line per ``interval_s`` saying how many were left out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class RateLimitedLog:
    """Thread-safe (the ZAP handler logs from its own thread)."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 10.0,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._level = level
        self._clock = clock
        self._lock = threading.Lock()
        self._next_at = float("-inf")
        self._suppressed = 0

    def __call__(self, msg: str, *args: object, exc_info: bool = False) -> None:
        with self._lock:
            now = self._clock()
            if now < self._next_at:
                self._suppressed += 1
                return
            suppressed, self._suppressed = self._suppressed, 0
            self._next_at = now + self._interval_s
        if suppressed:
            msg = f"{msg} (and {suppressed} more like it in the last {self._interval_s:g}s, not logged)"
        self._logger.log(self._level, msg, *args, exc_info=exc_info)
