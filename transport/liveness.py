"""Heartbeat expiry and reconnect back-off (zguide chapter 4, "Paranoid Pirate").

Any message from a peer counts as a heartbeat. A peer is dead after ``liveness`` heartbeat
intervals of silence. Pure bookkeeping: callers pass the clock in, so tests need no sleeps.
"""

from __future__ import annotations

import random


class PeerLiveness:
    """When did we last hear from a peer, and is it dead yet?"""

    def __init__(self, interval_s: float, liveness: int, now: float) -> None:
        self.interval_s = interval_s
        self.liveness = liveness
        self.last_seen = now

    def seen(self, now: float) -> None:
        self.last_seen = now

    @property
    def expiry_s(self) -> float:
        return self.interval_s * self.liveness

    def expired(self, now: float) -> bool:
        return now - self.last_seen > self.expiry_s


class Backoff:
    """Exponential back-off with full jitter, capped; ``reset`` after a success."""

    def __init__(
        self, initial_s: float = 0.1, max_s: float = 5.0, factor: float = 2.0, seed: int | None = None
    ):
        self.initial_s = initial_s
        self.max_s = max_s
        self.factor = factor
        self._attempt = 0
        self._rng = random.Random(seed)

    def next_delay(self) -> float:
        ceiling = min(self.max_s, self.initial_s * self.factor**self._attempt)
        self._attempt += 1
        # Jitter keeps a fleet of agents from reconnecting in lockstep after a scheduler restart.
        return ceiling / 2 + self._rng.random() * ceiling / 2

    def reset(self) -> None:
        self._attempt = 0
