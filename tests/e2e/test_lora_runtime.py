"""LoRA adapters loaded and unloaded at run time through the scheduler (vLLM's endpoints, for the
whole cluster): only admin keys may, only from the workers' adapter directory; a loaded adapter
serves exactly what a worker started with it serves, reaches workers that join later and survives
a scheduler restart; an unloaded one is gone everywhere."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from pdorch.launcher import LocalCluster
from tests.e2e.conftest import start_cluster
from tests.e2e.helpers import MODEL
from tests.support.lora import write_adapter
from tests.support.reference_core import CFG

pytestmark = pytest.mark.e2e

USER, ADMIN = "user-key", "admin-key"
BODY: dict[str, Any] = {
    "prompt": "Once upon a time, in a land far away, there lived a fox",
    "max_tokens": 12,
    "temperature": 0.8,
    "seed": 3,
    "extra_body": {"ignore_eos": True},
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    write_adapter(root / "sql", CFG, seed=1)
    write_adapter(root / "poem", CFG, seed=2)
    (root / "junk").mkdir()
    (root / "junk" / "adapter_config.json").write_text("{not json")
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, root: Path) -> Iterator[LocalCluster]:
    """Colocated, started with the adapters: what a loaded adapter must answer."""
    args = ["--lora", f"sql={root / 'sql'}", "--lora", f"poem={root / 'poem'}"]
    cluster = start_cluster(tmp_path_factory.mktemp("ref"), colocated=True, worker_args=args)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, root: Path) -> Iterator[LocalCluster]:
    logs = tmp_path_factory.mktemp("runtime")
    config = logs / "scheduler.yaml"
    config.write_text(f"api_keys: [{USER}, {ADMIN}]\nlora:\n  admin_keys: [{ADMIN}]\n  timeout_s: 30\n")
    cluster = start_cluster(logs, decode=2, lora_root=root, scheduler_args=["--config", str(config)])
    yield cluster
    cluster.stop()


def _post(cluster: LocalCluster, path: str, body: object, key: str = ADMIN) -> requests.Response:
    return requests.post(
        cluster.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )


def _load(cluster: LocalCluster, name: str, path: Path | str, **extra: object) -> requests.Response:
    return _post(cluster, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path), **extra})


def _text(cluster: LocalCluster, model: str, key: str = USER) -> str:
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key=key, max_retries=0, timeout=120)
    return client.completions.create(model=model, **BODY).choices[0].text or ""


def _served(cluster: LocalCluster) -> dict[str, list[str]]:
    return {w["worker_id"]: sorted(w["adapters"]) for w in cluster.cluster_state()["workers"]}


def _until(what: str, check: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout_s}s: {what}"
        time.sleep(0.2)


def test_only_admin_keys_may_load(cluster: LocalCluster, root: Path) -> None:
    for key in (USER, "nobody"):
        got = _post(cluster, "/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": str(root)}, key)
        assert got.status_code == 401, got.text
    assert all(a == [] for a in _served(cluster).values())


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"lora_name": "bad name", "lora_path": "/x"}, 400),
        ({"lora_name": "x" * 200, "lora_path": "/x"}, 400),
        ({"lora_name": "ok"}, 400),
        ({"lora_name": MODEL, "lora_path": "/x"}, 400),
        ({"lora_name": "ok", "lora_path": "/x", "base_model": "nope"}, 404),
        ([1, 2, 3], 400),
    ],
)
def test_malformed_loads_are_refused(cluster: LocalCluster, body: object, status: int) -> None:
    got = _post(cluster, "/v1/load_lora_adapter", body)
    assert got.status_code == status, got.text
    assert got.json()["error"]["message"]


def test_a_path_outside_the_adapter_directory_or_not_an_adapter_is_refused(
    cluster: LocalCluster, root: Path, tmp_path: Path
) -> None:
    outside = write_adapter(tmp_path / "sql", CFG, seed=1)
    (root / "escape").symlink_to(outside, target_is_directory=True)
    for path, why in ((outside, "outside"), (root / "escape", "outside"), (root / "junk", "")):
        got = _load(cluster, "sql", path)
        assert got.status_code == 400 and why in got.json()["error"]["message"], got.text
    assert all(a == [] for a in _served(cluster).values()), "nothing half-loaded"


def test_a_loaded_adapter_serves_what_a_worker_started_with_it_serves(
    cluster: LocalCluster, reference: LocalCluster, root: Path
) -> None:
    got = _load(cluster, "sql", root / "sql")
    assert got.status_code == 200 and "added successfully" in got.text, got.text
    assert list(_served(cluster).values()) == [["sql"]] * 3, "on every worker of the model"
    cards = {
        m["id"]: m
        for m in requests.get(cluster.url + "/v1/models", headers=_auth(), timeout=10).json()["data"]
    }
    assert cards["sql"]["parent"] == MODEL
    want = _text(reference, "sql")
    assert want != _text(reference, MODEL)
    for _ in range(4):  # over both decode workers
        assert _text(cluster, "sql") == want
    again = _load(cluster, "sql", root / "sql")
    assert again.status_code == 400 and "already" in again.json()["error"]["message"]
    assert _load(cluster, "sql", root / "sql", load_inplace=True).status_code == 200


def test_workers_that_join_later_and_a_restarted_scheduler_keep_it(
    cluster: LocalCluster, reference: LocalCluster, root: Path
) -> None:
    assert _load(cluster, "poem", root / "poem").status_code == 200
    cluster.start_worker("decode-2", "decode")
    _until("decode-2 serves both", lambda: _served(cluster).get("decode-2") == ["poem", "sql"])
    cluster.kill("scheduler")
    cluster.restart("scheduler")
    _until("the workers register again", lambda: len(_reachable_state(cluster)) == 4)
    cluster.start_worker("decode-3", "decode")
    _until("decode-3 serves both", lambda: _served(cluster).get("decode-3") == ["poem", "sql"])
    assert _text(cluster, "poem") == _text(reference, "poem")


def test_an_unloaded_adapter_is_gone_everywhere(cluster: LocalCluster, root: Path) -> None:
    if not any("sql" in a for a in _served(cluster).values()):
        assert _load(cluster, "sql", root / "sql").status_code == 200
    got = _post(cluster, "/v1/unload_lora_adapter", {"lora_name": "sql"})
    assert got.status_code == 200 and "removed successfully" in got.text, got.text
    assert all("sql" not in a for a in _served(cluster).values())
    with pytest.raises(openai.NotFoundError):
        _text(cluster, "sql")
    assert _post(cluster, "/v1/unload_lora_adapter", {"lora_name": "sql"}).status_code == 404


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {USER}"}


def _reachable_state(cluster: LocalCluster) -> list[dict[str, Any]]:
    try:
        return cluster.cluster_state()["workers"]
    except OSError:
        return []


def test_run_time_loading_is_off_unless_turned_on(reference: LocalCluster, root: Path) -> None:
    got = _load(reference, "other", root / "sql")
    assert got.status_code == 404 and "lora.runtime_updates" in got.json()["error"]["message"]
