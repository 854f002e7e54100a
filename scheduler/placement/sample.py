"""Which nodes one decision looks at in a large cluster: a sample, drawn by the request.

A decision predicts every candidate's latencies, so its cost grows with the cluster (~11 us per node
per decision). Past a few nodes per pool, looking at a few drawn at random and taking the best of
them ("power of k choices": Mitzenmacher; Sparrow's batch sampling) places nearly as well as looking
at all of them, at a cost that does not grow with the cluster. The sample takes ``k`` nodes of each
pool and accelerator class (a class of at most ``k`` whole, so a small class of fast nodes is
never missed): half of them the least busy by a count the ledger keeps current (the prompt tokens
queued to prefill there, or decoding there: the node the whole cluster's best would most likely
be), the other half at random (what that count does not see); plus up to ``k`` of the nodes
holding the most of the request's prompt prefix (a prefix hit is worth more than a random node's
headroom). The draw is seeded by the request, so a decision stays a pure function of its inputs
and the simulator takes the live scheduler's.

Whether the sample's answer stands is the planner's call (it looks at every node when the sample
cannot take the request within its own pools), and the sampler learns from it: a request whose
sample could not take it is looked at whole from then on (its sample would be the same nodes
again), and while most samples fail (pools short of room: a bursty prompt-heavy load can keep them
so at half of the cluster's goodput) only one decision in :data:`PROBE_EVERY` tries one, so a
sample that mostly fails costs little more than looking at every node.
"""

from __future__ import annotations

import heapq
import operator
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence

from scheduler.placement.context import request_rng
from scheduler.placement.types import PlacementRequest
from transport.messages import Hello, Role

# A node's prefix memory as a membership test of block hashes.
Holds = Callable[[object], bool]

# While fewer than half of the samples lately stood (an average over ~10), one decision in this
# many takes one (to see when they stand again).
PROBE_EVERY = 8
_RATE_WEIGHT = 0.1
# How many requests whose sample could not take them are remembered (a few seconds of waiting
# requests; one forgotten only takes its sample again).
WHOLE_REMEMBERED = 4096


class NodeSampler:
    """Draws the nodes of one decision. What it knows of them (their pools and classes, their prefix
    memories) is kept between decisions and worked out again when a node joins, leaves or says
    Hello again (nothing per node is built per decision)."""

    def __init__(self, k: int, seed: int) -> None:
        self.k = k
        self._seed = seed
        self._hellos: list[Hello] = []
        # Per model: the worker ids of each (prefill pool?, accelerator) group, sorted (the draw
        # must not depend on the order nodes are listed in); whether any group is over k; each
        # node's prefix memory.
        self._groups: dict[str, list[tuple[bool, list[str]]]] = {}
        self._large: dict[str, bool] = {}
        self._holds: dict[str, list[tuple[str, Holds]]] = {}
        # The share of samples lately stood, and the decisions since one was taken.
        self.stood_rate = 1.0
        self._skipped = 0
        self._whole: OrderedDict[str, None] = OrderedDict()

    def sample(
        self,
        request: PlacementRequest,
        hellos: Sequence[Hello],
        holds: Callable[[str], Holds],
        busy: Callable[[str, bool], int],
        exclude: frozenset[str] = frozenset(),
    ) -> frozenset[str] | None:
        """The worker ids to look at, or None for every node (``k`` is 0, or no class of either pool
        has more than ``k`` nodes). ``hellos``: every node's; ``holds``: a node's prefix memory;
        ``busy``: how busy a node is in the prefill pool (True) or the decode pool."""
        if self.k <= 0:
            return None
        if len(hellos) != len(self._hellos) or any(map(operator.is_not, hellos, self._hellos)):
            self._learn(hellos, holds)
        model = request.model
        if not self._large.get(model) or request.request_id in self._whole:
            return None
        if self.stood_rate < 0.5:
            self._skipped += 1
            if self._skipped < PROBE_EVERY:
                return None
        self._skipped = 0
        k = self.k
        rng = request_rng(self._seed, request.request_id, "sample")
        chosen: set[str] = set()
        for prefill_pool, ids in self._groups[model]:
            if exclude:
                ids = [i for i in ids if i not in exclude]
            if len(ids) <= k:
                chosen.update(ids)
                continue
            least = heapq.nsmallest(k // 2, ids, key=lambda i: busy(i, prefill_pool))
            chosen.update(least)
            taken = set(least)
            chosen.update(rng.sample([i for i in ids if i not in taken], k - len(least)))
        members = self._holds[model]
        if exclude:
            members = [m for m in members if m[0] not in exclude]
        chosen.update(_prefix_holders(request.block_hashes, members, k, rng))
        return frozenset(chosen)

    def record(self, request_id: str, stood: bool) -> None:
        """Whether the sample drawn for ``request_id`` took it."""
        self.stood_rate += _RATE_WEIGHT * (float(stood) - self.stood_rate)
        if not stood:
            self._whole[request_id] = None
            if len(self._whole) > WHOLE_REMEMBERED:
                self._whole.popitem(last=False)

    def _learn(self, hellos: Sequence[Hello], holds: Callable[[str], Holds]) -> None:
        self._hellos = list(hellos)
        groups: dict[str, dict[tuple[bool, str], list[str]]] = {}
        self._holds = {}
        for h in hellos:
            by_class = groups.setdefault(h.model, {})
            # A "both" node is in either pool.
            if h.role is not Role.DECODE:
                by_class.setdefault((True, h.accelerator), []).append(h.worker_id)
            if h.role is not Role.PREFILL:
                by_class.setdefault((False, h.accelerator), []).append(h.worker_id)
            self._holds.setdefault(h.model, []).append((h.worker_id, holds(h.worker_id)))
        self._groups = {
            m: [(c[0], sorted(by_class[c])) for c in sorted(by_class)] for m, by_class in groups.items()
        }
        self._large = {m: any(len(ids) > self.k for _, ids in g) for m, g in self._groups.items()}
        for members in self._holds.values():
            members.sort()


def _prefix_holders(
    block_hashes: Sequence[int], members: list[tuple[str, Holds]], k: int, rng: random.Random
) -> list[str]:
    """Up to ``k`` nodes holding the deepest of a few probes into the prompt's prefix blocks (the
    last, three quarters, half, a quarter, the first): a block's hash covers every block before it,
    so a node holding it holds at least that much of the prompt. A few look-ups per node, not one
    per block."""
    if not block_hashes:
        return []
    n = len(block_hashes)
    out: list[str] = []
    for i in sorted({n - 1, 3 * n // 4, n // 2, n // 4, 0}, reverse=True):
        h = block_hashes[i]
        held = [wid for wid, holds in members if holds(h) and wid not in out]
        room = k - len(out)
        out.extend(held if len(held) <= room else rng.sample(held, room))
        if len(out) >= k:
            break
    return out
