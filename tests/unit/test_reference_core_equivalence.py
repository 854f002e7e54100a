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

import msgspec
import pytest

from tests.support.reference_core import (
    CFG,
    Outputs,
    Request,
    collect,
    drain,
    random_prompt,
    run_colocated,
    run_disaggregated,
    token_ids,
)
from transport.errors import PdorchError
from transport.messages import FinishReason, SamplingParams
from workers.engines.reference.core import EngineCore


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
        requests[f"req-{i}"] = (random_prompt(length, seed=i), sampling)
    return requests


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_disaggregated_equals_colocated(seeded: bool) -> None:
    requests = _mixed_requests(seeded)
    colocated = token_ids(run_colocated(EngineCore(CFG, num_blocks=1024, block_size=16), requests))
    # The decode side uses another block size: the KV rows, not the block layout, are the contract.
    disaggregated = token_ids(
        run_disaggregated(
            EngineCore(CFG, num_blocks=1024, block_size=16),
            EngineCore(CFG, num_blocks=2048, block_size=8),
            requests,
            chunk=13,
        )
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
    full = token_ids(run_colocated(EngineCore(CFG, num_blocks=1024), requests))
    for cut in (1, 2, 5, 8):
        resumed = {f"{rid}@{cut}": (prompt + full[rid][:cut], s) for rid, (prompt, s) in requests.items()}
        offsets = dict.fromkeys(resumed, cut)
        want = {f"{rid}@{cut}": full[rid][cut:] for rid in requests}
        assert token_ids(run_colocated(EngineCore(CFG, num_blocks=1024), resumed, offsets)) == want
        split = token_ids(
            run_disaggregated(
                EngineCore(CFG, num_blocks=1024), EngineCore(CFG, num_blocks=1024), resumed, 11, offsets
            )
        )
        assert split == want
        assert all(len(t) == requests[rid.split("@")[0]][1].max_tokens - cut for rid, t in split.items())


def test_a_resume_point_must_leave_something_to_generate() -> None:
    core = EngineCore(CFG, num_blocks=64)
    for generated in (-1, 4, 5, 9):
        with pytest.raises(PdorchError):
            core.add_generate(
                "r", random_prompt(5, seed=1), SamplingParams(max_tokens=4), generated=generated
            )


def test_seeded_runs_differ_from_greedy() -> None:
    # Guards the test above against a sampler that ignores temperature.
    greedy = token_ids(run_colocated(EngineCore(CFG, num_blocks=1024), _mixed_requests(seeded=False)))
    seeded = token_ids(run_colocated(EngineCore(CFG, num_blocks=1024), _mixed_requests(seeded=True)))
    assert greedy != seeded


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "seeded"])
def test_same_tokens_alone_and_in_a_batch_of_thirty(temperature: float) -> None:
    target = (
        random_prompt(50, seed=99),
        SamplingParams(max_tokens=40, temperature=temperature, seed=5, ignore_eos=True),
    )
    alone = token_ids(run_colocated(EngineCore(CFG, num_blocks=512), {"target": target}))["target"]

    core = EngineCore(CFG, num_blocks=1024, max_batch=64)
    others = {
        f"other-{i}": (
            random_prompt(5 + 9 * i, seed=i),
            SamplingParams(max_tokens=10 + i, temperature=0.7, seed=i),
        )
        for i in range(30)
    }
    outputs: Outputs = {}
    done: set[str] = set()
    items = list(others.items())
    for rid, (prompt, sampling) in items[:15]:
        core.add_generate(rid, prompt, sampling)
    for _ in range(3):  # the target joins a batch that is already decoding
        collect(core.step(), outputs, done)
    core.add_generate("target", *target)
    for rid, (prompt, sampling) in items[15:]:
        core.add_generate(rid, prompt, sampling)
    drain(core, outputs, done)
    assert token_ids(outputs)["target"] == alone
    assert done == {"target", *others}


def test_requests_added_from_another_thread_while_stepping() -> None:
    requests = {
        f"r{i}": (random_prompt(3 + 11 * i, seed=i), SamplingParams(max_tokens=12, temperature=0.5, seed=i))
        for i in range(20)
    }
    expected = token_ids(run_colocated(EngineCore(CFG, num_blocks=512), requests))

    core = EngineCore(CFG, num_blocks=512)

    def submit() -> None:
        for rid, (prompt, sampling) in requests.items():
            core.add_generate(rid, prompt, sampling)

    submitter = threading.Thread(target=submit)
    submitter.start()
    outputs: Outputs = {}
    done: set[str] = set()
    deadline = time.monotonic() + 120
    while done != set(requests):
        assert time.monotonic() < deadline, "requests from another thread never finished"
        collect(core.step(), outputs, done)
    submitter.join(timeout=10)
    assert token_ids(outputs) == expected
    assert core.load().blocks_used == 0


def test_prefill_only_reports_its_own_end() -> None:
    core = EngineCore(CFG, num_blocks=64)
    core.add_prefill("one", random_prompt(20, seed=1), SamplingParams(max_tokens=1))
    core.add_prefill("more", random_prompt(20, seed=1), SamplingParams(max_tokens=5))
    outputs = {out.request_id: out for out in core.step()}
    assert outputs["one"].finish_reason is FinishReason.LENGTH
    assert outputs["more"].finish_reason is None
    assert outputs["one"].token_id == outputs["more"].token_id
    assert core.load().blocks_used == 0
    assert not core.has_work()
