"""Driving the reference engine's core by hand: colocated, or disaggregated (the KV copied row chunk
by row chunk into another core's reserved blocks), resumed or not, keeping every step output."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from transport.messages import SamplingParams
from workers.engines.reference.config import ModelConfig
from workers.engines.reference.core import EngineCore
from workers.engines.reference.step_output import StepOutput

CFG = ModelConfig()
MAX_STEPS = 5000

Request = tuple[list[int], SamplingParams]
Outputs = dict[str, list[StepOutput]]


def random_prompt(length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 256, length).tolist()


def token_ids(outputs: Outputs) -> dict[str, list[int]]:
    return {rid: [o.token_id for o in outs] for rid, outs in outputs.items()}


def collect(step: list[StepOutput], outputs: Outputs, done: set[str]) -> None:
    for out in step:
        assert not out.failed, out
        assert out.request_id not in done, f"{out.request_id} produced output after finishing"
        outputs.setdefault(out.request_id, []).append(out)
        if out.finish_reason is not None:
            done.add(out.request_id)


def drain(core: EngineCore, outputs: Outputs, done: set[str]) -> None:
    for _ in range(MAX_STEPS):
        if not core.has_work():
            return
        collect(core.step(), outputs, done)
    raise AssertionError("core did not drain")


def run_colocated(
    core: EngineCore, requests: dict[str, Request], generated: dict[str, int] | None = None
) -> Outputs:
    outputs: Outputs = {}
    done: set[str] = set()
    for rid, (prompt, sampling) in requests.items():
        core.add_generate(rid, prompt, sampling, generated=(generated or {}).get(rid, 0))
    drain(core, outputs, done)
    assert done == set(requests)
    assert core.load().blocks_used == 0
    return outputs


def run_disaggregated(
    prefill_core: EngineCore,
    decode_core: EngineCore,
    requests: dict[str, Request],
    chunk: int,
    generated: dict[str, int] | None = None,
) -> Outputs:
    """Prefill everything on one core, move the KV row chunk by row chunk, decode on the other."""
    kv: dict[str, dict[int, np.ndarray]] = {rid: {} for rid in requests}
    resumed = generated or {}

    def keeper(rid: str) -> Callable[[int, np.ndarray], None]:
        return lambda layer, rows: kv[rid].__setitem__(layer, rows)

    for rid, (prompt, sampling) in requests.items():
        prefill_core.add_prefill(rid, prompt, sampling, on_layer=keeper(rid), generated=resumed.get(rid, 0))
    first: Outputs = {}
    prefilled: set[str] = set()
    drain(prefill_core, first, prefilled)
    assert prefill_core.load().blocks_used == 0  # a prefill worker keeps nothing
    outputs: Outputs = {rid: list(outs) for rid, outs in first.items()}
    done = {rid for rid in requests if rid in prefilled}
    for rid, (prompt, sampling) in requests.items():
        assert len(first[rid]) == 1
        assert sorted(kv[rid]) == list(range(CFG.layers))
        if rid in done:
            continue
        blocks = decode_core.reserve_decode(rid, len(prompt))
        for layer, rows in kv[rid].items():
            for start in range(0, len(prompt), chunk):
                decode_core.cache.scatter(layer, blocks, start, rows[start : start + chunk])
        decode_core.add_decode(
            rid,
            len(prompt),
            first[rid][0].token_id,
            sampling,
            prompt_token_ids=prompt,
            generated=resumed.get(rid, 0),
        )
    drain(decode_core, outputs, done)
    assert done == set(requests)
    assert decode_core.load().blocks_used == 0
    return outputs
