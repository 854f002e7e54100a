"""LoRA adapters for a simulated workload: which adapter each trace request runs with.

No public trace records adapters, so they are drawn: request ``i`` runs adapter ``k`` (of ``count``)
with probability proportional to ``1 / (k + 1) ** zipf`` (a few popular adapters, a long tail, as
S-LoRA and dLoRA model multi-tenant LoRA serving), from a generator seeded with ``seed``: the same
trace and settings give the same assignment. A request's prefix-block ids are salted with its
adapter (the same prompt under two adapters is two prefixes, as in the engines' caches). Every
simulated worker serves all ``count`` adapters and holds ``max_loras`` at once; loading one costs
``load_s`` seconds.
"""

from __future__ import annotations

import argparse

import msgspec
import numpy as np

from scheduler.placement.prefix import salt_block_hashes
from simulate.trace import Trace
from transport.errors import ErrorCode, PdorchError


class AdapterSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    count: int = 0  # adapters (0 = every request runs the base model)
    zipf: float = 1.0  # popularity exponent (0 = uniform)
    max_loras: int = 4  # adapter slots per worker
    load_s: float = 0.1  # seconds per adapter load
    seed: int = 0

    def names(self) -> list[str]:
        return [f"lora-{k:03d}" for k in range(self.count)]

    def check(self) -> None:
        if self.count < 0 or self.max_loras < 1 or self.load_s < 0 or self.zipf < 0:
            raise PdorchError(
                ErrorCode.CONFIG,
                f"bad adapter settings {msgspec.to_builtins(self)}: need count >= 0, max_loras >= 1, "
                "load_s >= 0, zipf >= 0",
            )


def assign_adapters(trace: Trace, spec: AdapterSpec) -> Trace:
    """``trace`` with an adapter drawn for every request (unchanged when ``spec.count`` is 0)."""
    spec.check()
    if spec.count == 0 or not trace.requests:
        return trace
    weights = 1.0 / np.arange(1, spec.count + 1, dtype=float) ** spec.zipf
    rng = np.random.default_rng(spec.seed)
    drawn = rng.choice(spec.count, size=len(trace.requests), p=weights / weights.sum())
    names = spec.names()
    reqs = tuple(
        msgspec.structs.replace(r, adapter=names[k], hash_ids=salt_block_hashes(r.hash_ids, names[k]))
        for r, k in zip(trace.requests, drawn.tolist(), strict=True)
    )
    return Trace(trace.name, reqs, trace.prefix_block_tokens)


def add_adapter_arguments(p: argparse.ArgumentParser) -> None:
    """The command-line options of :class:`AdapterSpec` (``pdorch simulate`` and the benches)."""
    d = AdapterSpec()
    p.add_argument("--adapters", type=int, default=0, help="LoRA adapters drawn per request (0 = none)")
    p.add_argument("--adapter-zipf", type=float, default=d.zipf, help="adapter popularity exponent")
    p.add_argument("--max-loras", type=int, default=d.max_loras, help="adapter slots per worker")
    p.add_argument("--adapter-load-s", type=float, default=d.load_s, help="seconds per adapter load")
    p.add_argument("--adapter-seed", type=int, default=0, help="seed of the adapter assignment")


def adapter_spec(args: argparse.Namespace) -> AdapterSpec:
    """The checked :class:`AdapterSpec` of options added by :func:`add_adapter_arguments`."""
    spec = AdapterSpec(
        count=args.adapters,
        zipf=args.adapter_zipf,
        max_loras=args.max_loras,
        load_s=args.adapter_load_s,
        seed=args.adapter_seed,
    )
    spec.check()
    return spec
