"""Which LoRA adapters the cluster serves by registration, and what each worker must do to match.

An adapter registered through the API (``POST /v1/load_lora_adapter``) is loaded on every worker of
its base model, including the ones that join later; an unloaded one is removed from every worker
that still has it, including one that was cut off when it was unloaded and comes back. Adapters a
worker was started with (``--lora``) are that worker's own business and left alone.

A scheduler that restarts learns the registrations back from the workers' ``Hello`` (which lists
the adapters each loaded at run time, with their paths); what it cannot learn back is an unload it
did before restarting, so a worker that was cut off across both keeps that adapter until it is
unloaded again.
"""

from __future__ import annotations

import msgspec

from transport.messages import Hello


class Registration(msgspec.Struct, frozen=True):
    name: str
    path: str  # on the workers' disks
    base: str  # the model it adapts


class AdapterRegistry:
    def __init__(self) -> None:
        self._registered: dict[str, Registration] = {}
        self._removed: set[str] = set()

    def get(self, name: str) -> Registration | None:
        return self._registered.get(name)

    def register(self, reg: Registration) -> None:
        self._registered[reg.name] = reg
        self._removed.discard(reg.name)

    def remove(self, name: str) -> None:
        self._registered.pop(name, None)
        self._removed.add(name)

    def learn(self, hello: Hello) -> None:
        """Take in the run-time adapters a (re)joining worker reports (a restarted scheduler's
        only record of them), unless they were unloaded since."""
        for name, path in hello.adapter_paths.items():
            if name not in self._removed and name not in self._registered:
                self._registered[name] = Registration(name, path, hello.model)

    def to_load(self, hello: Hello) -> list[Registration]:
        """The registered adapters of this worker's model that it does not serve."""
        served = set(hello.adapters)
        return [r for r in self._registered.values() if r.base == hello.model and r.name not in served]

    def to_unload(self, hello: Hello) -> list[str]:
        """Adapters it loaded at run time that were unloaded from the cluster since."""
        return [name for name in hello.adapter_paths if name in self._removed]
