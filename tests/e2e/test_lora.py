"""LoRA adapters through pdorch: listed in /v1/models with their base model as parent, asked for by
name as the request's model, placed only on workers that serve them, and disaggregated ==
colocated with them in both KV modes (adapters built here: seeded matrices in the PEFT layout)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from pdorch.launcher import LocalCluster
from tests.e2e.conftest import start_cluster
from tests.e2e.helpers import MODEL
from tests.support.lora import write_adapter
from tests.support.reference_core import CFG

pytestmark = pytest.mark.e2e

PROMPT = "Once upon a time, in a land far away, there lived a fox"
BODY: dict[str, Any] = {
    "prompt": PROMPT,
    "max_tokens": 12,
    "temperature": 0.8,
    "seed": 3,
    "extra_body": {"ignore_eos": True},
}


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: write_adapter(root / name, CFG, seed=i) for i, name in enumerate(["sql", "poem"], start=1)}


def _lora_args(dirs: dict[str, Path]) -> list[str]:
    return [arg for name, path in dirs.items() for arg in ("--lora", f"{name}={path}")]


@pytest.fixture(scope="module")
def clusters(
    tmp_path_factory: pytest.TempPathFactory, adapter_dirs: dict[str, Path]
) -> Iterator[dict[str, LocalCluster]]:
    """Colocated; p2p and centralized with 2 decode workers of which only decode-1 serves "poem"."""
    both = _lora_args(adapter_dirs)
    sql_only = _lora_args({"sql": adapter_dirs["sql"]})
    started: dict[str, LocalCluster] = {}
    try:
        started["colocated"] = start_cluster(tmp_path_factory.mktemp("c"), colocated=True, worker_args=both)
        for mode in ("p2p", "centralized"):
            started[mode] = start_cluster(
                tmp_path_factory.mktemp(mode),
                kv_mode=mode,
                decode=2,
                worker_args=sql_only,
                per_worker_args={"prefill-0": both[2:], "decode-1": both[2:]},
            )
        yield started
    finally:
        for cluster in started.values():
            cluster.stop()


def _client(cluster: LocalCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_adapters_are_listed_with_their_base_model(clusters: dict[str, LocalCluster]) -> None:
    client = _client(clusters["p2p"])
    cards = {m.id: m.model_dump() for m in client.models.list()}
    assert cards["sql"]["parent"] == cards["poem"]["parent"] == MODEL
    assert "parent" not in cards[MODEL]
    assert client.models.retrieve("poem").model_dump()["parent"] == MODEL
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", **BODY)


@pytest.mark.parametrize("mode", ["p2p", "centralized"])
def test_disaggregated_equals_colocated_with_adapters(clusters: dict[str, LocalCluster], mode: str) -> None:
    want = {
        m: _client(clusters["colocated"]).completions.create(model=m, **BODY).choices[0].text
        for m in (MODEL, "sql", "poem")
    }
    assert len(set(want.values())) == 3, "each adapter changes the output"
    # "poem" lives on one decode worker only: every request for it must be placed there.
    for _ in range(4):
        for m in (MODEL, "sql", "poem"):
            got = _client(clusters[mode]).completions.create(model=m, **BODY)
            assert (got.model, got.choices[0].text) == (m, want[m])
