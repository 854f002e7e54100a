"""Admission control: a bounded, fair-share queue in front of placement.

``queue.py`` is the pure core (ordering across tenants and priorities, bounds, retry-after hints);
``gate.py`` wraps it for asyncio: requests wait for capacity instead of landing on a full node.
"""
