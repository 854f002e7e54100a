"""LoRA adapters on the reference engine: read from the PEFT layout, applied exactly as merged
weights would be, mixed in one decode batch, kept apart in the prefix cache, evicted and reloaded."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import msgspec
import numpy as np
import pytest

from tests.support.lora import write_adapter
from tests.support.reference_core import CFG, drain, random_prompt, token_ids
from transport.errors import ErrorCode, PdorchError
from transport.messages import SamplingParams
from workers.engines.reference.core import EngineCore
from workers.engines.reference.lora.adapter import load_adapter
from workers.engines.reference.model import ReferenceModel
from workers.engines.reference.weights import LayerWeights, init_weights

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=0.9, seed=7, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "sql": write_adapter(root / "sql", CFG, seed=1),
        "poem": write_adapter(root / "poem", CFG, seed=2, rank=8, alpha=4.0),
        "attn-only": write_adapter(root / "attn", CFG, seed=3, targets=("q_proj", "v_proj")),
    }


def _core(adapters: dict[str, Path], slots: int = 4, **kw: int) -> EngineCore:
    core = EngineCore(CFG, num_blocks=256, max_loras=slots, **kw)
    for name, path in adapters.items():
        core.adapters.register(name, path)
    return core


def _alone(adapters: dict[str, Path], prompt: list[int], sampling: SamplingParams, adapter: str) -> list[int]:
    core = _core(adapters)
    core.add_generate("r", prompt, sampling, adapter=adapter)
    outputs: dict = {}
    drain(core, outputs, set())
    return token_ids(outputs)["r"]


def test_an_adapter_is_the_merged_weights(adapters: dict[str, Path]) -> None:
    """x @ W + scale * x @ A.T @ B.T, as PEFT defines it: the same logits as the weights merged."""
    adapter = load_adapter("sql", adapters["sql"], CFG)
    from safetensors.numpy import load_file

    raw = load_file(str(adapters["sql"] / "adapter_model.safetensors"))
    scale = 8.0 / 4
    base = init_weights(CFG)

    def merged(layer: int, module: str, target: str) -> np.ndarray:
        key = f"base_model.model.model.layers.{layer}.{module}.{target}"
        return (raw[f"{key}.lora_B.weight"].astype(np.float64) @ raw[f"{key}.lora_A.weight"]).T * scale

    layers = []
    for i, w in enumerate(base.layers):
        qkv = np.concatenate([merged(i, "self_attn", t) for t in ("q_proj", "k_proj", "v_proj")], axis=1)
        gate_up = np.concatenate([merged(i, "mlp", t) for t in ("gate_proj", "up_proj")], axis=1)
        layers.append(
            dataclasses.replace(
                w,
                wqkv=w.wqkv + qkv,
                wo=w.wo + merged(i, "self_attn", "o_proj"),
                w_gate_up=w.w_gate_up + gate_up,
                w_down=w.w_down + merged(i, "mlp", "down_proj"),
            )
        )
    assert all(isinstance(layer, LayerWeights) for layer in layers)
    prompt = random_prompt(40, seed=3)
    with_adapter = ReferenceModel(CFG).forward_full(prompt, adapter)
    with_merged = ReferenceModel(CFG, dataclasses.replace(base, layers=tuple(layers))).forward_full(prompt)
    np.testing.assert_allclose(with_adapter, with_merged, atol=1e-9)
    assert np.abs(with_adapter - ReferenceModel(CFG).forward_full(prompt)).max() > 1e-2


def test_an_adapter_changes_the_output(adapters: dict[str, Path]) -> None:
    prompt = random_prompt(30, seed=4)
    base = _alone(adapters, prompt, GREEDY, "")
    outputs = {name: _alone(adapters, prompt, GREEDY, name) for name in adapters}
    assert all(tokens != base for tokens in outputs.values())
    assert len({tuple(t) for t in outputs.values()}) == len(adapters)


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_batch_mixing_adapters_and_the_base_gives_each_its_tokens_alone(
    adapters: dict[str, Path], sampling: SamplingParams
) -> None:
    requests = {
        f"r{i}": (random_prompt(20 + 7 * i, seed=10 + i), name) for i, name in enumerate(["", *adapters])
    }
    core = _core(adapters)
    for rid, (prompt, name) in requests.items():
        core.add_generate(rid, prompt, sampling, adapter=name)
    outputs: dict = {}
    drain(core, outputs, set())
    together = token_ids(outputs)
    for rid, (prompt, name) in requests.items():
        assert together[rid] == _alone(adapters, prompt, sampling, name), rid


def test_disaggregated_equals_colocated_with_an_adapter(adapters: dict[str, Path]) -> None:
    prompt = random_prompt(50, seed=5)
    prefill, decode = _core(adapters), _core(adapters)
    kv: dict[int, np.ndarray] = {}
    prefill.add_prefill("r", prompt, SEEDED, on_layer=kv.__setitem__, adapter="poem")
    first: dict = {}
    drain(prefill, first, set())
    blocks = decode.reserve_decode("r", len(prompt))
    for layer, rows in kv.items():
        decode.cache.scatter(layer, blocks, 0, rows)
    decode.add_decode(
        "r", len(prompt), first["r"][0].token_id, SEEDED, prompt_token_ids=prompt, adapter="poem"
    )
    rest: dict = {}
    drain(decode, rest, set())
    assert [first["r"][0].token_id, *token_ids(rest)["r"]] == _alone(adapters, prompt, SEEDED, "poem")
    assert decode.adapters.resident() and prefill.load().blocks_used == decode.load().blocks_used == 0


def test_an_adapters_cached_prefix_never_serves_another(adapters: dict[str, Path]) -> None:
    core = _core(adapters)
    prompt = random_prompt(64, seed=6)

    def cached(rid: str, adapter: str) -> int:
        core.add_generate(rid, prompt, GREEDY, adapter=adapter)
        outputs: dict = {}
        drain(core, outputs, set())
        return outputs[rid][0].cached_tokens

    assert cached("a", "sql") == 0
    assert cached("b", "poem") == 0  # same tokens, another adapter: nothing shared
    assert cached("c", "") == 0  # nor the base model
    assert cached("d", "sql") == 48  # its own prefix, yes (3 full blocks; the last is recomputed)
    assert core.load().cached_blocks > 0


def test_eviction_and_reload(adapters: dict[str, Path], tmp_path: Path) -> None:
    core = EngineCore(CFG, num_blocks=256, max_loras=1)
    core.adapters.register("sql", adapters["sql"])
    core.adapters.register("poem", adapters["poem"])  # evicts sql (nobody uses it)
    assert core.adapters.resident() == ["poem"] and core.adapters.known() == ["poem", "sql"]
    prompt = random_prompt(25, seed=8)
    outputs: dict = {}
    core.add_generate("a", prompt, GREEDY, adapter="sql")  # read again, poem evicted
    assert core.adapters.resident() == ["sql"]
    with pytest.raises(PdorchError) as full:
        core.add_generate("b", prompt, GREEDY, adapter="poem")  # the one slot is in use
    assert full.value.code is ErrorCode.QUEUE_FULL
    drain(core, outputs, set())
    core.add_generate("b", prompt, GREEDY, adapter="poem")  # free again: sql evicted
    drain(core, outputs, set())
    got = token_ids(outputs)
    assert got["a"] == _alone(adapters, prompt, GREEDY, "sql")
    assert got["b"] == _alone(adapters, prompt, GREEDY, "poem")
    with pytest.raises(PdorchError) as unknown:
        core.add_generate("c", prompt, GREEDY, adapter="nope")
    assert unknown.value.code is ErrorCode.MODEL_NOT_FOUND
    core.adapters.unregister("sql")
    assert core.adapters.known() == ["poem"]


def test_an_adapter_that_does_not_fit_the_model_is_refused(tmp_path: Path) -> None:
    other = msgspec.structs.replace(CFG, hidden=CFG.hidden * 2)
    wrong = write_adapter(tmp_path / "wrong", other, seed=1)
    with pytest.raises(PdorchError, match="expected") as e:
        load_adapter("wrong", wrong, CFG)
    assert e.value.code is ErrorCode.CONFIG
    dora = write_adapter(tmp_path / "dora", CFG, seed=1)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(PdorchError, match="use_dora"):
        load_adapter("dora", dora, CFG)


def test_unloading_an_adapter_in_use_lets_its_requests_finish(adapters: dict[str, Path]) -> None:
    """Unregistered while a request runs with it: new requests are refused at once, the running
    one finishes with the adapter's tokens, and its slot is freed when it ends."""
    core = EngineCore(CFG, num_blocks=256, max_loras=2)
    core.adapters.register("sql", adapters["sql"])
    prompt = random_prompt(25, seed=9)
    core.add_generate("a", prompt, GREEDY, adapter="sql")
    core.adapters.unregister("sql")
    assert core.adapters.known() == [] and core.adapters.resident() == ["sql"]
    assert core.load().adapters_resident == ["sql"] and core.load().adapter_slots == 2
    with pytest.raises(PdorchError) as gone:
        core.add_generate("b", prompt, GREEDY, adapter="sql")
    assert gone.value.code is ErrorCode.MODEL_NOT_FOUND
    with pytest.raises(PdorchError):
        core.adapters.unregister("sql")  # already unloaded
    outputs: dict = {}
    drain(core, outputs, set())
    assert token_ids(outputs)["a"] == _alone(adapters, prompt, GREEDY, "sql")
    assert core.adapters.resident() == [] and core.load().adapters_resident == []
    core.adapters.register("sql", adapters["sql"])  # and it can be loaded again
    assert core.adapters.known() == ["sql"]
