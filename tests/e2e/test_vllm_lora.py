"""Real vLLM on CPU with a LoRA adapter (seeded, in the PEFT layout, built here for the tiny test
model): vLLM lists it, serves it under its name, disaggregated == colocated with it in both KV
modes, and the reference engine with the same weights and adapter gives vLLM's greedy tokens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.support.lora import write_adapter
from tests.vllm_support.environment import build_tiny_model, vllm_python
from tests.vllm_support.pd_pair import (
    Cluster,
    Engines,
    colocated,
    disaggregated,
    pd_engines,
    pd_servers,
    route,
)
from transport.errors import PdorchError
from transport.messages import SamplingParams
from workers.engines.reference.checkpoint import load_checkpoint, model_config
from workers.engines.reference.core import EngineCore

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=0.8, seed=5, ignore_eos=True)
PROMPTS = [list(range(5, 45)), list(range(100, 190, 2)), [7, 8, 9] * 30]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    python = vllm_python()
    work = tmp_path_factory.mktemp("vllm-lora")
    model_dir = build_tiny_model(python, work)
    adapter = write_adapter(work / "sql", model_config(model_dir), seed=1, rank=8, alpha=16.0)
    with pd_servers(python, model_dir, work, served_model_name="tiny", loras={"sql": str(adapter)}) as pair:
        pair.adapter_dir = adapter  # type: ignore[attr-defined]
        yield pair


@pytest.fixture
async def engines(cluster: Cluster) -> AsyncIterator[Engines]:
    async with pd_engines(cluster) as e:
        yield e


async def test_vllm_lists_the_adapter(engines: Engines) -> None:
    assert engines.prefill.info().model == "tiny"
    assert engines.prefill.info().adapters == engines.decode.info().adapters == ("sql",)


@pytest.mark.parametrize("mode", ["p2p", "centralized"])
@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
async def test_disaggregated_equals_colocated_with_an_adapter(
    cluster: Cluster, engines: Engines, mode: str, sampling: SamplingParams
) -> None:
    tag = f"{mode}-{sampling.temperature}"
    for i, prompt in enumerate(PROMPTS):
        base = await colocated(engines.prefill, engines.p_out, f"{tag}-base{i}", prompt, sampling)
        want = await colocated(engines.prefill, engines.p_out, f"{tag}-c{i}", prompt, sampling, "sql")
        assert want != base, "the adapter changes the output"
        got = await disaggregated(
            engines, f"{tag}-d{i}", prompt, sampling, route(mode, cluster, f"{tag}-t{i}"),
            decode_first=i % 2 == 0, adapter="sql",
        )  # fmt: skip
        assert got == want, i


async def test_the_reference_engine_gives_vllms_tokens_with_the_adapter(
    cluster: Cluster, engines: Engines
) -> None:
    config, weights = load_checkpoint(cluster.model_dir)
    for i, prompt in enumerate(PROMPTS):
        want = await colocated(engines.prefill, engines.p_out, f"ref-{i}", prompt, GREEDY, "sql")
        core = EngineCore(config, 256, weights=weights)
        core.adapters.register("sql", cluster.adapter_dir)  # type: ignore[attr-defined]
        core.add_generate("r", prompt, GREEDY, adapter="sql")
        got: list[int] = []
        while core.has_work():
            got += [out.token_id for out in await asyncio.to_thread(core.step)]
        assert got == want, i


async def test_an_adapter_loaded_and_unloaded_at_run_time_through_vllms_api(
    cluster: Cluster, engines: Engines, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The agent's AdapterLoad on a vLLM worker: vLLM's /v1/load_lora_adapter; the adapter then
    serves P/D == colocated, its slots show in the load report, and unloading refuses it."""
    poem = write_adapter(
        tmp_path_factory.mktemp("poem") / "poem", model_config(cluster.model_dir), seed=2, rank=8, alpha=16.0
    )
    for engine in (engines.prefill, engines.decode):
        await engine.load_adapter("poem", str(poem))
        assert engine.info().adapters == ("sql", "poem")
    prompt = PROMPTS[0]
    sql = await colocated(engines.prefill, engines.p_out, "rt-sql", prompt, GREEDY, "sql")
    want = await colocated(engines.prefill, engines.p_out, "rt-c", prompt, GREEDY, "poem")
    assert want != sql
    got = await disaggregated(
        engines, "rt-d", prompt, GREEDY, route("p2p", cluster, "rt-t"), decode_first=True, adapter="poem"
    )
    assert got == want
    deadline = asyncio.get_running_loop().time() + 10
    while engines.prefill.load().adapter_slots != 4:  # vLLM's --max-loras, from its metrics
        assert asyncio.get_running_loop().time() < deadline, engines.prefill.load()
        await asyncio.sleep(0.2)
    for engine in (engines.prefill, engines.decode):
        await engine.unload_adapter("poem")
        assert engine.info().adapters == ("sql",)
    with pytest.raises(PdorchError):
        await colocated(engines.prefill, engines.p_out, "rt-gone", prompt, GREEDY, "poem")
