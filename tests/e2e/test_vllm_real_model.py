"""Real vLLM on CPU serving the default model (SmolLM2-135M-Instruct) from pdorch's GGUF conversion.

- disaggregated through pdorch's connector equals colocated vLLM, greedy and seeded (with top-p,
  and with top-k and min-p), peer to peer and through the KV broker (fewer prompts than the tiny
  model's ``test_vllm_pd.py``);
- pdorch in front of it (the scheduler's tokenizer and chat template, two agents) answers the
  France question with Paris, exactly as vLLM itself does;
- the reference engine and vLLM, on the same weights, choose the same greedy tokens for as long as
  their numerics agree: vLLM computes in float32 and the reference engine in float64, so their
  log-probabilities differ by ~1e-5; a prompt may part ways only where two candidates are closer
  than that tolerance, and the report says where.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from scheduler.tokenizer.hf import HfTokenizer
from tests.e2e.helpers import eventually
from tests.support.real_model import default_model_dir
from tests.vllm_support.environment import vllm_python
from tests.vllm_support.pd_pair import (
    Cluster,
    Engines,
    check_equality,
    colocated,
    pd_engines,
    pd_servers,
    pdorch_in_front,
)
from transport.messages import SamplingParams
from workers.engines.reference.checkpoint import load_checkpoint
from workers.engines.reference.kv_cache import BlockAllocator, PagedKvCache
from workers.engines.reference.model import ReferenceModel
from workers.models.catalog import DEFAULT_MODEL

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

TEXTS = [
    "The capital of Germany is",
    "Once upon a time, there was a little girl who",
    "def fibonacci(n):",
    "In 1969, the first man to walk on the moon was",
    "The three primary colors are " + "red, yellow and blue. " * 8,  # several 32-token vLLM blocks
]
CHATS = [
    [("user", "What is the capital of France?")],
    [("system", "You are a concise assistant."), ("user", "Name three colors.")],
    [("user", "Write one sentence about the sea.")],
]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
# Log-probabilities of the two engines differ by at most ~5e-5 here (measured over hundreds of
# positions); a choice closer than this is numerically ambiguous between float32 and float64.
NUMERIC_TOLERANCE = 1e-3
COMPARED_TOKENS = 24


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    python = vllm_python()
    model_dir = default_model_dir()
    work = tmp_path_factory.mktemp("vllm-real")
    # The same-host KV path forced on: a handoff that could not go through shared memory fails
    # (with auto it would fall back to TCP unseen). test_vllm_pd covers the TCP path.
    spec = {
        "max_num_seqs": 8,
        "max_model_len": 2048,
        "served_model_name": DEFAULT_MODEL,
        "kv_same_host": "on",
    }
    with pd_servers(python, model_dir, work, **spec) as pair:
        tok = HfTokenizer(model_dir)
        pair.prompts = [tok.encode(t) for t in TEXTS] + [tok.apply_chat_template(c) for c in CHATS]
        yield pair


@pytest.fixture
async def engines(cluster: Cluster) -> AsyncIterator[Engines]:
    async with pd_engines(cluster) as e:
        yield e


@pytest.mark.parametrize("mode", ["p2p", "centralized"])
async def test_disaggregated_equals_colocated_greedy_and_seeded(
    cluster: Cluster, engines: Engines, mode: str
) -> None:
    await check_equality(cluster, engines, SamplingParams(max_tokens=16), f"greedy-{mode}", mode)
    seeded = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.95, seed=7)
    await check_equality(cluster, engines, seeded, f"seeded-{mode}", mode)
    cut = SamplingParams(max_tokens=12, temperature=1.0, top_k=20, min_p=0.05, seed=11)
    await check_equality(cluster, engines, cut, f"top-k-min-p-{mode}", mode)
    # (and the cut reaches vLLM: top_k 1 is greedy whatever the temperature)
    prompt = cluster.prompts[0]
    greedy = await colocated(
        engines.prefill, engines.p_out, f"greedy-1-{mode}", prompt, SamplingParams(max_tokens=12)
    )
    hot = SamplingParams(max_tokens=12, temperature=1.5, top_k=1, seed=5)
    assert await colocated(engines.prefill, engines.p_out, f"top-k-1-{mode}", prompt, hot) == greedy


async def _chat(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    body = {"model": DEFAULT_MODEL, "messages": FRANCE, "max_tokens": 24, "temperature": 0.0}
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        data = await resp.json()
        assert resp.status == 200, data
        return data["choices"][0]


async def test_pdorch_in_front_of_vllm_answers_like_vllm(cluster: Cluster, tmp_path: Path) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        want = await _chat(session, cluster.prefill.url)
        with pdorch_in_front(cluster, "p2p", tmp_path) as stack:
            have = await _chat(session, stack.url)
    assert "Paris" in have["message"]["content"], have
    assert (have["message"]["content"], have["finish_reason"]) == (
        want["message"]["content"],
        want["finish_reason"],
    )


async def test_with_no_decode_worker_left_the_vllm_prefill_worker_serves_requests_whole(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The default placement lends the prefill pool's decode capacity: with the decode worker gone,
    the vLLM prefill server (a KV producer) runs each request whole, and answers as plain vLLM."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        want = await _chat(session, cluster.prefill.url)
        with pdorch_in_front(cluster, "p2p", tmp_path) as stack:
            stack.kill("decode-0")

            def only_prefill_left() -> bool:
                return [w["worker_id"] for w in stack.cluster_state()["workers"]] == ["prefill-0"]

            await eventually(only_prefill_left, 30, "the scheduler dropping the dead decode worker")
            have = await _chat(session, stack.url)
    assert (have["message"]["content"], have["finish_reason"]) == (
        want["message"]["content"],
        want["finish_reason"],
    )


def _reference_greedy(
    model: ReferenceModel, prompt: list[int], steps: int
) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and, per position, the log-probabilities they were chosen from."""
    cfg = model.cfg
    cache = PagedKvCache(cfg, 64, 16)
    blocks = BlockAllocator(64).allocate(cache.blocks_for(len(prompt) + steps))
    logits = model.prefill(prompt, cache, blocks)
    tokens: list[int] = []
    logprobs: list[np.ndarray] = []
    for i in range(steps):
        shifted = logits - logits.max()
        logprobs.append(shifted - np.log(np.exp(shifted).sum()))
        tokens.append(int(np.argmax(logits)))
        if tokens[-1] == cfg.eos_token_id:
            break
        logits = model.decode_step([(tokens[-1], len(prompt) + i, blocks)], cache)[0]
    return tokens, logprobs


async def _vllm_greedy(url: str, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    body = {"model": DEFAULT_MODEL, "prompt": prompt, "max_tokens": steps, "temperature": 0.0}
    body |= {"logprobs": 1, "return_token_ids": True}
    timeout = aiohttp.ClientTimeout(total=120)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(url + "/v1/completions", json=body) as resp,
    ):
        choice = (await resp.json())["choices"][0]
    return choice["token_ids"], choice["logprobs"]["token_logprobs"]


async def test_the_reference_engine_and_vllm_agree_while_their_numerics_do(cluster: Cluster) -> None:
    cfg, weights = load_checkpoint(cluster.model_dir, max_model_len=1024)
    model = ReferenceModel(cfg, weights)  # float64, as the reference engine serves it
    report, full_agreement, largest_gap = [], 0, 0.0
    for prompt in cluster.prompts:
        ours, our_logprobs = _reference_greedy(model, prompt, COMPARED_TOKENS)
        theirs, their_logprobs = await _vllm_greedy(cluster.prefill.url, prompt, COMPARED_TOKENS)
        apart = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
        agreed = len(ours) if apart is None else apart
        for i in range(agreed):  # the same choice, from (numerically) the same distribution
            largest_gap = max(largest_gap, abs(float(our_logprobs[i][ours[i]]) - their_logprobs[i]))
        if apart is None:
            assert ours == theirs[: len(ours)] and len(ours) in (len(theirs), COMPARED_TOKENS)
            full_agreement += 1
            report.append(f"{len(prompt)}-token prompt: {agreed} tokens agree")
            continue
        margin = float(our_logprobs[apart][ours[apart]] - our_logprobs[apart][theirs[apart]])
        report.append(
            f"{len(prompt)}-token prompt: agree for {apart} tokens, then {ours[apart]} (reference) vs "
            f"{theirs[apart]} (vLLM), {margin:.2e} apart in the reference's log-probabilities"
        )
        assert margin < NUMERIC_TOLERANCE, "\n".join(report)
    print("\n".join(report), f"\nlargest log-probability gap on agreed tokens: {largest_gap:.2e}")
    assert largest_gap < NUMERIC_TOLERANCE / 2, "the engines' numerics differ more than float32 rounding"
    assert full_agreement >= len(cluster.prompts) // 2, "\n".join(report)
