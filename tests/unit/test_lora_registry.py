"""The cluster's run-time adapter registry: what a (re)joining worker must load and unload."""

from __future__ import annotations

from scheduler.lora.registry import AdapterRegistry, Registration
from transport.messages import Hello, Role


def hello(
    wid: str, *, model: str, adapters: list[str] | None = None, adapter_paths: dict[str, str] | None = None
) -> Hello:
    return Hello(
        1,
        wid,
        Role.BOTH,
        "reference",
        model,
        4096,
        16,
        100,
        adapters=adapters or [],
        adapter_paths=adapter_paths or {},
    )


def test_a_joining_worker_gets_the_registered_adapters_of_its_model() -> None:
    reg = AdapterRegistry()
    reg.register(Registration("sql", "/a/sql", "m"))
    reg.register(Registration("other", "/a/other", "m2"))
    assert [r.name for r in reg.to_load(hello("w", model="m"))] == ["sql"]
    assert reg.to_load(hello("w", model="m", adapters=["sql"])) == []


def test_a_restarted_scheduler_learns_run_time_adapters_from_hellos() -> None:
    reg = AdapterRegistry()
    reg.learn(hello("w1", model="m", adapters=["sql", "boot"], adapter_paths={"sql": "/a/sql"}))
    assert reg.get("sql") == Registration("sql", "/a/sql", "m")
    assert reg.get("boot") is None, "adapters a worker was started with are its own"
    assert [r.name for r in reg.to_load(hello("w2", model="m"))] == ["sql"]


def test_an_unloaded_adapter_is_removed_from_a_worker_that_comes_back_with_it() -> None:
    reg = AdapterRegistry()
    reg.register(Registration("sql", "/a/sql", "m"))
    reg.remove("sql")
    back = hello("w", model="m", adapters=["sql"], adapter_paths={"sql": "/a/sql"})
    reg.learn(back)
    assert reg.get("sql") is None
    assert reg.to_unload(back) == ["sql"] and reg.to_load(back) == []
    assert reg.to_unload(hello("w", model="m", adapters=["sql"])) == [], "its own --lora adapter stays"
    reg.register(Registration("sql", "/a/sql", "m"))
    assert reg.to_unload(back) == []
