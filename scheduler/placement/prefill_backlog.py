"""Is a node's prefill queue short enough for this request to join? The test behind late binding.

Shared by the ``prefill-backlog`` filter (prefill nodes) and the decider (the decode node's own
queue, before it prefills a request itself), so neither imports the other.
"""

from __future__ import annotations

from scheduler.placement.context import RequestContext
from scheduler.placement.types import NodeView


def backlog_ok(ctx: RequestContext, node: NodeView, max_wait_s: float, relative: float) -> bool:
    """Queued prefill work there, less what its prefix cache saves this request, is within the wait.

    The allowed wait is ``max_wait_s``, or ``relative`` x the request's own uncached prefill time
    there when that is longer (a long prompt may queue behind more than a short one).
    """
    rate = ctx.prefill_rate(node)
    wait = (node.queued_prefill_tokens - ctx.cached_tokens(node)) / rate
    return wait <= max(max_wait_s, relative * ctx.uncached_tokens(node) / rate)
