"""The simulated cluster's shape: ``N:CLASS[xTP]`` pools, e.g. ``--prefill 8:h100 --decode 8:a100x4``."""

from __future__ import annotations

import msgspec

from transport.errors import ErrorCode, PdorchError
from transport.messages import Role
from workers.engines.sim.cost import accelerator_classes, parse_instance_class


class InstanceSpec(msgspec.Struct, frozen=True):
    role: Role
    accelerator: str
    tp: int


class ClusterSpec(msgspec.Struct, frozen=True):
    instances: tuple[InstanceSpec, ...]

    @property
    def gpus(self) -> int:
        return sum(i.tp for i in self.instances)

    def colocated(self) -> ClusterSpec:
        """The same hardware with every instance doing both prefill and decode."""
        return ClusterSpec(tuple(msgspec.structs.replace(i, role=Role.BOTH) for i in self.instances))

    def describe(self) -> str:
        counts: dict[tuple[str, str, int], int] = {}
        for i in self.instances:
            key = (str(i.role), i.accelerator, i.tp)
            counts[key] = counts.get(key, 0) + 1
        parts = [f"{n}x {role} {acc}x{tp}" for (role, acc, tp), n in counts.items()]
        return f"{', '.join(parts)} ({self.gpus} GPUs)"


def parse_pool(text: str, role: Role, default_tp: int = 4) -> list[InstanceSpec]:
    count_text, sep, cls_text = text.partition(":")
    try:
        count = int(count_text)
    except ValueError:
        count = -1
    if not sep or count < 0:
        raise PdorchError(
            ErrorCode.CONFIG, f"bad pool {text!r}; expected N:CLASS or N:CLASSxTP, e.g. 8:h100x4"
        )
    accelerator, tp = parse_instance_class(cls_text, default_tp)
    if accelerator not in accelerator_classes():
        known = ", ".join(accelerator_classes())
        raise PdorchError(
            ErrorCode.CONFIG, f"unknown accelerator class {accelerator!r} in {text!r}; known: {known}"
        )
    return [InstanceSpec(role, accelerator, tp) for _ in range(count)]


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
