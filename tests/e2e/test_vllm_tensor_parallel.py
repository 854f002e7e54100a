"""Real vLLM on CPU with tensor parallelism 2 on both sides: each worker process (rank) of the
prefill server sends its part of a request's KV to the same rank of the decode server, and the
disaggregated answers equal the colocated ones.

A rank's transfer is its own (``transfer_params.PdorchKvParams.route_for``): rank 1 receives at the
decode server's KV port + 1 and its transfer id is the request's with ``/tp1``; vLLM counts a
request's load or send over once both ranks have reported it. The tiny model has two KV heads, so
each rank holds one: a rank that sent or loaded the other's part, or a load counted over after one
rank alone, would give other tokens than colocated vLLM.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from pdorch.launcher import LocalCluster
from scheduler.tokenizer.hf import HfTokenizer
from tests.e2e.helpers import metric
from tests.vllm_support.environment import build_tiny_model, vllm_python
from tests.vllm_support.pd_pair import (
    Cluster,
    Engines,
    check_equality,
    pd_engines,
    pd_servers,
    pdorch_in_front,
)
from transport.messages import SamplingParams
from workers.engines.vllm.transfer_params import rank_endpoint

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

MODEL = "tiny-llama"
TEXTS = [
    "hello",
    "please write a short story about a cat and a river at night",
    "one two three four five six seven eight nine ten " * 14,  # several KV blocks
    "café naïve über 東京 こんにちは 🙂 " * 4,
]


@pytest.fixture(scope="module", params=["auto", "off"], ids=["same-host", "tcp"])
def cluster(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    python = vllm_python()
    work = tmp_path_factory.mktemp("vllm-tp")
    model_dir = build_tiny_model(python, work)
    spec = {"max_num_seqs": 8, "served_model_name": MODEL, "kv_same_host": request.param}
    with pd_servers(python, model_dir, work, tensor_parallel_size=2, **spec) as pair:
        tok = HfTokenizer(model_dir)
        pair.prompts = [tok.encode(t) for t in TEXTS]
        yield pair


@pytest.fixture
async def engines(cluster: Cluster) -> AsyncIterator[Engines]:
    async with pd_engines(cluster) as e:
        yield e


def test_each_decode_rank_listens_at_its_own_kv_endpoint(cluster: Cluster) -> None:
    for rank in (0, 1):
        host, _, port = rank_endpoint(cluster.kv_endpoint, rank).removeprefix("tcp://").rpartition(":")
        with socket.create_connection((host, int(port)), timeout=5):
            pass


@pytest.mark.parametrize("mode", ["p2p", "centralized"])
async def test_greedy_disaggregated_equals_colocated(cluster: Cluster, engines: Engines, mode: str) -> None:
    await check_equality(cluster, engines, SamplingParams(max_tokens=12), f"tp-greedy-{mode}", mode)


async def test_seeded_sampling_disaggregated_equals_colocated(cluster: Cluster, engines: Engines) -> None:
    s = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=7)
    await check_equality(cluster, engines, s, "tp-seeded", "p2p")


@pytest.fixture(scope="module")
def stack(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with pdorch_in_front(cluster, "p2p", tmp_path_factory.mktemp("tp-stack")) as stack:
        yield stack


async def test_pdorch_serves_tensor_parallel_vllm_like_colocated(
    cluster: Cluster, stack: LocalCluster
) -> None:
    """Through pdorch's HTTP API and two agents, the tensor-parallel pair answers as plain vLLM, each
    request handed off (the decode side's route names no endpoint: its ranks derive only ids)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        handoffs = await metric(session, stack.url, "pdorch_kv_handoffs_total", mode="p2p", outcome="ok")
        for text in TEXTS:
            body = {"model": MODEL, "prompt": text, "max_tokens": 12, "temperature": 0.0}
            answers = []
            for url in (cluster.prefill.url, stack.url):
                async with session.post(
                    url + "/v1/completions", json={**body, "return_token_ids": True}
                ) as resp:
                    data = await resp.json()
                    assert resp.status == 200, data
                    answers.append(data["choices"][0]["token_ids"])
            assert answers[1] == answers[0], text
        after = await metric(session, stack.url, "pdorch_kv_handoffs_total", mode="p2p", outcome="ok")
        assert after - handoffs == len(TEXTS)
