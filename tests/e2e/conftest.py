"""Real pdorch clusters: separate OS processes on 127.0.0.1, started the way `pdorch up` does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pdorch.launcher import ClusterSpec, LocalCluster
from workers.models.catalog import RANDOM_MODEL


def start_cluster(log_dir: Path, **spec: object) -> LocalCluster:
    """A cluster of the random-weight model unless ``model`` says otherwise (it needs no download
    and keeps the many end-to-end tests fast)."""
    spec.setdefault("model", RANDOM_MODEL)
    cluster = LocalCluster(ClusterSpec(port=0, log_dir=log_dir, log_level="WARNING", **spec))  # type: ignore[arg-type]
    try:
        cluster.start(timeout_s=90)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def start_scheduler_only(tmp_path: Path, config: str) -> LocalCluster:
    """A scheduler with ``config`` as its config file and no workers (a test brings its own)."""
    path = tmp_path / "scheduler.yaml"
    path.write_text(config)
    return start_cluster(tmp_path, prefill=0, decode=0, scheduler_args=["--config", str(path)])


@pytest.fixture(scope="module")
def colocated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("colocated"), colocated=True)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def p2p(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """p2p handoffs through shared memory: forced on, so a handoff that cannot use it fails."""
    cluster = start_cluster(
        tmp_path_factory.mktemp("p2p"), kv_mode="p2p", worker_args=["--kv-same-host", "on"]
    )
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def p2p_tcp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """p2p handoffs over TCP although both workers share this host."""
    cluster = start_cluster(
        tmp_path_factory.mktemp("p2p-tcp"), kv_mode="p2p", worker_args=["--kv-same-host", "off"]
    )
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def centralized(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("centralized"), kv_mode="centralized")
    yield cluster
    cluster.stop()
