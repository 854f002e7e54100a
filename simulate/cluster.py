"""The simulated cluster's shape: ``N:CLASS[xTP][@SLOWDOWN]`` pools, e.g. ``--prefill 8:h100 --decode
7:a100x4 --decode 1:a100x4@2`` (the last a degraded A100 instance that takes twice as long)."""

from __future__ import annotations

import math

import msgspec

from transport.errors import ErrorCode, PdorchError
from transport.messages import Role
from workers.engines.sim.cost import accelerator_classes, parse_instance_class


class InstanceSpec(msgspec.Struct, frozen=True):
    role: Role
    accelerator: str
    tp: int
    slowdown: float = 1.0  # every duration times this: a degraded instance of its class


class ClusterSpec(msgspec.Struct, frozen=True):
    instances: tuple[InstanceSpec, ...]

    @property
    def gpus(self) -> int:
        return sum(i.tp for i in self.instances)

    def colocated(self) -> ClusterSpec:
        """The same hardware with every instance doing both prefill and decode."""
        return ClusterSpec(tuple(msgspec.structs.replace(i, role=Role.BOTH) for i in self.instances))

    def describe(self) -> str:
        counts: dict[tuple[str, str, int, float], int] = {}
        for i in self.instances:
            key = (str(i.role), i.accelerator, i.tp, i.slowdown)
            counts[key] = counts.get(key, 0) + 1
        parts = [
            f"{n}x {role} {acc}x{tp}" + (f" ({slow:g}x slower)" if slow != 1 else "")
            for (role, acc, tp, slow), n in counts.items()
        ]
        return f"{', '.join(parts)} ({self.gpus} GPUs)"


def parse_pool(text: str, role: Role, default_tp: int = 4) -> list[InstanceSpec]:
    count_text, sep, rest = text.partition(":")
    cls_text, at, slow_text = rest.partition("@")
    try:
        count = int(count_text)
        slowdown = float(slow_text) if at else 1.0
    except ValueError:
        count, slowdown = -1, 1.0
    if not sep or count < 0 or not (math.isfinite(slowdown) and slowdown > 0):
        raise PdorchError(
            ErrorCode.CONFIG,
            f"bad pool {text!r}; expected N:CLASS[xTP][@SLOWDOWN], e.g. 8:h100x4 or 1:a100x4@2",
        )
    accelerator, tp = parse_instance_class(cls_text, default_tp)
    if accelerator not in accelerator_classes():
        known = ", ".join(accelerator_classes())
        raise PdorchError(
            ErrorCode.CONFIG, f"unknown accelerator class {accelerator!r} in {text!r}; known: {known}"
        )
    return [InstanceSpec(role, accelerator, tp, slowdown) for _ in range(count)]


def parse_cluster(
    prefill: list[str], decode: list[str], both: list[str] = (), default_tp: int = 4
) -> ClusterSpec:  # type: ignore[assignment]
    instances: list[InstanceSpec] = []
    for text in prefill:
        instances += parse_pool(text, Role.PREFILL, default_tp)
    for text in decode:
        instances += parse_pool(text, Role.DECODE, default_tp)
    for text in both:
        instances += parse_pool(text, Role.BOTH, default_tp)
    if not instances:
        raise PdorchError(ErrorCode.CONFIG, "the cluster has no instances")
    return ClusterSpec(tuple(instances))
