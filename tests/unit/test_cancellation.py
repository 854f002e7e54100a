"""A cancelled wait ends cancelled, even when what it waited for arrives in the same turn.

On Python 3.11, ``asyncio.wait_for`` returns the result when the awaited thing completes in the
same turn of the event loop as the waiter's cancellation, and the cancellation is lost (fixed in
3.12, where ``wait_for`` is built on ``asyncio.timeout``): a request handler told to stop runs on,
and a close() that cancels a task and waits for it can wait forever. The project waits with
``asyncio.timeout`` instead.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from scheduler.lora.operations import _bounded

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("scheduler", "workers", "transport", "simulate", "pdorch")


async def test_an_operation_cancelled_as_it_gets_the_lock_does_not_run() -> None:
    lock = asyncio.Lock()
    await lock.acquire()
    ran = []

    async def operation() -> None:
        async with _bounded(lock, 10.0):
            ran.append(True)

    task = asyncio.create_task(operation())
    await asyncio.sleep(0)  # waiting for the lock
    lock.release()  # handed to the waiter...
    task.cancel()  # ...in the same turn as it is cancelled
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not ran
    assert not lock.locked()  # and nothing holds it


def test_no_module_waits_with_wait_for() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\bwait_for\(", line) and not line.lstrip().startswith("#")
    ]
    assert not offenders, f"asyncio.wait_for loses cancellations on Python 3.11: {offenders}"
