"""The core's main promise: a request's tokens do not depend on where or with whom it ran.

Colocated (``add_generate``) output must equal disaggregated output (``add_prefill`` on one core,
its KV scattered into another core's reserved blocks, ``add_decode`` there), token for token,
greedy and seeded; a request alone must equal the same request inside a busy batch; and a request
resumed from any point (its prompt plus the tokens it had produced, ``generated`` = their number)
continues with exactly the tokens the uninterrupted run produced, colocated or disaggregated.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import msgspec
import numpy as np
import pytest

from transport.errors import PdorchError
from transport.messages import FinishReason, SamplingParams
from workers.engines.reference.config import ModelConfig
from workers.engines.reference.core import EngineCore
from workers.engines.reference.step_output import StepOutput

CFG = ModelConfig()
MAX_STEPS = 5000

Request = tuple[list[int], SamplingParams]


def _prompt(length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 256, length).tolist()


def _collect(outputs: list[StepOutput], tokens: dict[str, list[int]], done: set[str]) -> None:
    for out in outputs:
        assert not out.failed, out
        assert out.request_id not in done, f"{out.request_id} produced output after finishing"
        tokens.setdefault(out.request_id, []).append(out.token_id)
        if out.finish_reason is not None:
            done.add(out.request_id)


def _drain(core: EngineCore, tokens: dict[str, list[int]], done: set[str]) -> None:
    for _ in range(MAX_STEPS):
        if not core.has_work():
            return
        _collect(core.step(), tokens, done)
    raise AssertionError("core did not drain")


def run_colocated(
    core: EngineCore, requests: dict[str, Request], generated: dict[str, int] | None = None
) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    done: set[str] = set()
    for rid, (prompt, sampling) in requests.items():
        core.add_generate(rid, prompt, sampling, generated=(generated or {}).get(rid, 0))
    _drain(core, tokens, done)
    assert done == set(requests)
    assert core.load().blocks_used == 0
    return tokens


def run_disaggregated(
    prefill_core: EngineCore,
    decode_core: EngineCore,
    requests: dict[str, Request],
    chunk: int,
    generated: dict[str, int] | None = None,
) -> dict[str, list[int]]:
    """Prefill everything on one core, move the KV row chunk by row chunk, decode on the other."""
    kv: dict[str, dict[int, np.ndarray]] = {rid: {} for rid in requests}
    resumed = generated or {}

    def keeper(rid: str) -> Callable[[int, np.ndarray], None]:
        return lambda layer, rows: kv[rid].__setitem__(layer, rows)

    for rid, (prompt, sampling) in requests.items():
        prefill_core.add_prefill(rid, prompt, sampling, on_layer=keeper(rid), generated=resumed.get(rid, 0))
    first: dict[str, list[int]] = {}
    prefilled: set[str] = set()
    _drain(prefill_core, first, prefilled)
    assert prefill_core.load().blocks_used == 0  # a prefill worker keeps nothing
    tokens: dict[str, list[int]] = {rid: list(t) for rid, t in first.items()}
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
        decode_core.add_decode(rid, len(prompt), first[rid][0], sampling, generated=resumed.get(rid, 0))
    _drain(decode_core, tokens, done)
    assert done == set(requests)
    assert decode_core.load().blocks_used == 0
    return tokens


def _mixed_requests(seeded: bool) -> dict[str, Request]:
    lengths = [1, 2, 5, 15, 16, 17, 31, 33, 64, 90, 100, 128, 150, 200, 255, 256, 257, 280, 300, 7]
    max_tokens = [1, 2, 5, 17, 40]
    requests: dict[str, Request] = {}
    for i, length in enumerate(lengths):
        sampling = SamplingParams(
            max_tokens=max_tokens[i % len(max_tokens)],
            temperature=0.9 if seeded else 0.0,
            top_p=0.9 if seeded else 1.0,
            seed=1000 + i,
            ignore_eos=i % 3 == 0,
        )
        requests[f"req-{i}"] = (_prompt(length, seed=i), sampling)
    return requests


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_disaggregated_equals_colocated(seeded: bool) -> None:
    requests = _mixed_requests(seeded)
    colocated = run_colocated(EngineCore(CFG, num_blocks=1024, block_size=16), requests)
    # The decode side uses another block size: the KV rows, not the block layout, are the contract.
    disaggregated = run_disaggregated(
        EngineCore(CFG, num_blocks=1024, block_size=16),
        EngineCore(CFG, num_blocks=2048, block_size=8),
        requests,
        chunk=13,
    )
    assert disaggregated == colocated
    for rid, (_, sampling) in requests.items():
        assert 1 <= len(colocated[rid]) <= sampling.max_tokens
    assert any(len(t) == 40 for t in colocated.values())


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_a_resumed_request_continues_with_the_uninterrupted_tokens(seeded: bool) -> None:
    """What the scheduler does when a worker dies mid-request: prompt + the tokens already streamed,
    ``generated`` = how many; the rest must be the tokens the lost worker would have produced."""
    requests = {
        rid: (
            prompt,
            msgspec.structs.replace(sampling, ignore_eos=True, max_tokens=max(sampling.max_tokens, 9)),
        )
        for rid, (prompt, sampling) in _mixed_requests(seeded).items()
    }
    full = run_colocated(EngineCore(CFG, num_blocks=1024), requests)
    for cut in (1, 2, 5, 8):
        resumed = {f"{rid}@{cut}": (prompt + full[rid][:cut], s) for rid, (prompt, s) in requests.items()}
        offsets = dict.fromkeys(resumed, cut)
        want = {f"{rid}@{cut}": full[rid][cut:] for rid in requests}
        assert run_colocated(EngineCore(CFG, num_blocks=1024), resumed, offsets) == want
        split = run_disaggregated(
            EngineCore(CFG, num_blocks=1024), EngineCore(CFG, num_blocks=1024), resumed, 11, offsets
        )
        assert split == want
        assert all(len(t) == requests[rid.split("@")[0]][1].max_tokens - cut for rid, t in split.items())


def test_a_resume_point_must_leave_something_to_generate() -> None:
    core = EngineCore(CFG, num_blocks=64)
    for generated in (-1, 4, 5, 9):
        with pytest.raises(PdorchError):
            core.add_generate("r", _prompt(5, seed=1), SamplingParams(max_tokens=4), generated=generated)


def test_seeded_runs_differ_from_greedy() -> None:
    # Guards the test above against a sampler that ignores temperature.
    greedy = run_colocated(EngineCore(CFG, num_blocks=1024), _mixed_requests(seeded=False))
    seeded = run_colocated(EngineCore(CFG, num_blocks=1024), _mixed_requests(seeded=True))
    assert greedy != seeded


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "seeded"])
def test_same_tokens_alone_and_in_a_batch_of_thirty(temperature: float) -> None:
    target = (
        _prompt(50, seed=99),
        SamplingParams(max_tokens=40, temperature=temperature, seed=5, ignore_eos=True),
    )
    alone = run_colocated(EngineCore(CFG, num_blocks=512), {"target": target})["target"]

    core = EngineCore(CFG, num_blocks=1024, max_batch=64)
    others = {
        f"other-{i}": (_prompt(5 + 9 * i, seed=i), SamplingParams(max_tokens=10 + i, temperature=0.7, seed=i))
        for i in range(30)
    }
    tokens: dict[str, list[int]] = {}
    done: set[str] = set()
    items = list(others.items())
    for rid, (prompt, sampling) in items[:15]:
        core.add_generate(rid, prompt, sampling)
    for _ in range(3):  # the target joins a batch that is already decoding
        _collect(core.step(), tokens, done)
    core.add_generate("target", *target)
    for rid, (prompt, sampling) in items[15:]:
        core.add_generate(rid, prompt, sampling)
    _drain(core, tokens, done)
    assert tokens["target"] == alone
    assert done == {"target", *others}


def test_requests_added_from_another_thread_while_stepping() -> None:
    requests = {
        f"r{i}": (_prompt(3 + 11 * i, seed=i), SamplingParams(max_tokens=12, temperature=0.5, seed=i))
        for i in range(20)
    }
    expected = run_colocated(EngineCore(CFG, num_blocks=512), requests)

    core = EngineCore(CFG, num_blocks=512)

    def submit() -> None:
        for rid, (prompt, sampling) in requests.items():
            core.add_generate(rid, prompt, sampling)

    submitter = threading.Thread(target=submit)
    submitter.start()
    tokens: dict[str, list[int]] = {}
    done: set[str] = set()
    deadline = time.monotonic() + 120
    while done != set(requests):
        assert time.monotonic() < deadline, "requests from another thread never finished"
        _collect(core.step(), tokens, done)
    submitter.join(timeout=10)
    assert tokens == expected
    assert core.load().blocks_used == 0


def test_prefill_only_reports_its_own_end() -> None:
    core = EngineCore(CFG, num_blocks=64)
    core.add_prefill("one", _prompt(20, seed=1), SamplingParams(max_tokens=1))
    core.add_prefill("more", _prompt(20, seed=1), SamplingParams(max_tokens=5))
    outputs = {out.request_id: out for out in core.step()}
    assert outputs["one"].finish_reason is FinishReason.LENGTH
    assert outputs["more"].finish_reason is None
    assert outputs["one"].token_id == outputs["more"].token_id
    assert core.load().blocks_used == 0
    assert not core.has_work()
