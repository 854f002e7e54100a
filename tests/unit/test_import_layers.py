"""The house's dependency rules, checked on what each entry point really loads.

``transport`` imports neither ``scheduler`` nor ``workers``; ``scheduler`` never imports
``workers``; placement loads nothing of the scheduler but itself (no predictor, no cluster state, no
sockets or event loop); an agent (and so every vLLM worker process, which loads the KV plane) does not load
the KV broker server, nor any engine but its own.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _loaded(module: str) -> set[str]:
    return _loaded_by(f"import {module}")


def _loaded_by(code: str) -> set[str]:
    """The modules loaded after running ``code`` in a fresh interpreter."""
    script = f"{code}\nimport json, sys; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    return set(json.loads(out.stdout))


def _top(modules: set[str], package: str) -> set[str]:
    return {m for m in modules if m == package or m.startswith(package + ".")}


@pytest.mark.parametrize("module", ["transport.kv", "transport.messages", "transport.kv.broker_cli"])
def test_transport_loads_neither_scheduler_nor_workers(module: str) -> None:
    loaded = _loaded(module)
    assert not _top(loaded, "scheduler") and not _top(loaded, "workers")


def test_scheduler_does_not_load_workers() -> None:
    assert not _top(_loaded("scheduler.app"), "workers")


def test_placement_loads_nothing_of_the_scheduler_but_itself() -> None:
    loaded = _loaded("scheduler.placement.framework")
    assert _top(loaded, "scheduler") - _top(loaded, "scheduler.placement") == {"scheduler"}
    assert not (_top(loaded, "asyncio") | _top(loaded, "zmq") | _top(loaded, "aiohttp"))
    assert "scheduler.placement.plugins" in loaded  # the check is meaningful: the plugins are loaded


def test_agent_does_not_load_the_broker_server() -> None:
    loaded = _loaded("workers.main")
    assert "transport.kv.broker" not in loaded
    assert "transport.kv" in loaded  # the check is meaningful: the KV plane itself is loaded


ENGINES = ("reference", "vllm", "sim")


@pytest.mark.parametrize("engine", ENGINES)
def test_a_worker_loads_only_the_engine_it_builds(engine: str) -> None:
    loaded = _loaded_by(
        "import argparse\n"
        "from workers import main\n"
        "from transport.security import Security\n"
        "from workers.engines.engine_cli import AgentParts\n"
        "p = argparse.ArgumentParser()\n"
        "main.add_arguments(p)\n"
        f"args = p.parse_args(['--engine', '{engine}'])\n"
        f"main._engine_cli('{engine}').build(args, AgentParts(None, Security.insecure()))"
    )
    assert f"workers.engines.{engine}.engine" in loaded  # the check is meaningful: it was built
    for other in ENGINES:
        if other != engine:
            package = f"workers.engines.{other}"
            # Its flags are on the command line; nothing else of it is loaded.
            assert _top(loaded, package) == {package, f"{package}.cli"}
