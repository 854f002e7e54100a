"""The real-time simulated engine in-process, with a real KV plane on 127.0.0.1.

Prefill on one engine + decode on another must equal generate on a third, token for token, with the
stand-in KV really crossing the KV plane (p2p and through a broker). Plus load accounting, cancel,
continuous batching and failure paths. Modeled durations are scaled down (``time_scale``) so the
suite stays fast; nothing here asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import zmq.asyncio

from tests.support.kv import wait_until
from tests.support.security import INSECURE
from transport.errors import ErrorCode, PdorchError
from transport.kv import KvReceiver, KvSender
from transport.kv.broker import KvBroker
from transport.messages import (
    DecodeJob,
    FromWorker,
    GenerateJob,
    KvLoaded,
    KvMode,
    KvRoute,
    PrefillJob,
    SamplingParams,
    TokenOutput,
)
from workers.engines.sim.config import SimEngineConfig
from workers.engines.sim.engine import SimulatedEngine
from workers.engines.sim.kv_handoff import KvLink, send_standin

WAIT_S = 30.0  # generous: a shared 2-core machine; success never waits for it
FAST = SimEngineConfig(time_scale=0.001, mean_output_tokens=20)


class Running:
    """A started engine and everything it emitted."""

    def __init__(self, engine: SimulatedEngine) -> None:
        self.engine = engine
        self.sent: list[FromWorker] = []

    def tokens(self, rid: str) -> list[int]:
        return [
            t for m in self.sent if isinstance(m, TokenOutput) and m.request_id == rid for t in m.token_ids
        ]

    def finish(self, rid: str) -> str | None:
        reasons = [m.finish_reason for m in self.sent if isinstance(m, TokenOutput) and m.request_id == rid]
        return reasons[-1] if reasons else None


@pytest.fixture
async def receiver(ctx: zmq.asyncio.Context) -> AsyncIterator[KvReceiver]:
    rx = KvReceiver(ctx, security=INSECURE, bind="tcp://127.0.0.1:0", park_s=5.0)
    await rx.start()
    yield rx
    await rx.close()


@pytest.fixture
async def start() -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    engines: list[SimulatedEngine] = []

    async def make(config: SimEngineConfig = FAST, **kv: Any) -> Running:
        engine = SimulatedEngine(config, **kv)
        running = Running(engine)
        await engine.start(running.sent.append)
        engines.append(engine)
        return running

    yield make
    for engine in engines:
        await engine.close()


def cases() -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(11)
    out = []
    for i, n in enumerate([1, 2, 15, 16, 17, 100, 257, 700, 1500, 40, 64, 3]):
        prompt = [rng.randrange(0, 256) for _ in range(n)]
        sampling = SamplingParams(
            max_tokens=[1, 2, 9, 40, 120][i % 5],
            temperature=0.0 if i % 2 else 0.8,
            seed=100 + i,
            ignore_eos=i % 4 == 3,
        )
        out.append((prompt, sampling))
    return out


async def disaggregated(
    prefill: Running,
    decode: Running,
    rid: str,
    prompt: list[int],
    sampling: SamplingParams,
    mode: str,
    endpoint: str,
) -> None:
    """What the scheduler does: decode job first, then prefill; no handoff when token 0 ends it."""
    if sampling.max_tokens == 1:
        await prefill.engine.prefill(PrefillJob(rid, prompt, sampling, None, WAIT_S))
        return
    tid = f"t-{rid}"
    decode_route = KvRoute(mode, endpoint if mode == "centralized" else "", tid)
    decoding = asyncio.create_task(
        decode.engine.decode(DecodeJob(rid, prompt, sampling, decode_route, WAIT_S))
    )
    await prefill.engine.prefill(PrefillJob(rid, prompt, sampling, KvRoute(mode, endpoint, tid), WAIT_S))
    if prefill.finish(rid) is not None:  # EOS at token 0: the scheduler cancels the decode job
        decoding.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(decoding, WAIT_S)
        return
    await asyncio.wait_for(decoding, WAIT_S)
    loaded = [m for m in decode.sent if isinstance(m, KvLoaded) and m.request_id == rid]
    assert loaded == [KvLoaded(rid, prefill.tokens(rid)[0])]


@pytest.mark.parametrize("mode", ["p2p", "centralized"])
async def test_disaggregated_equals_colocated_token_for_token(
    start: Callable[..., Awaitable[Running]],
    sender: KvSender,
    receiver: KvReceiver,
    broker: KvBroker,
    mode: str,
) -> None:
    prefill = await start(kv_sender=sender)
    decode = await start(kv_receiver=receiver)
    colocated = await start()
    endpoint = receiver.endpoint if mode == "p2p" else broker.endpoint
    work = cases()
    await asyncio.wait_for(
        asyncio.gather(
            *(colocated.engine.generate(GenerateJob(f"r{i}", p, s, WAIT_S)) for i, (p, s) in enumerate(work)),
            *(disaggregated(prefill, decode, f"r{i}", p, s, mode, endpoint) for i, (p, s) in enumerate(work)),
        ),
        WAIT_S,
    )
    lengths = []
    for i, (_, sampling) in enumerate(work):
        rid = f"r{i}"
        expected = colocated.tokens(rid)
        assert prefill.tokens(rid) + decode.tokens(rid) == expected
        assert 1 <= len(expected) <= sampling.max_tokens
        assert colocated.finish(rid) == (decode.finish(rid) or prefill.finish(rid))
        lengths.append(len(expected))
    assert any(n < s.max_tokens for n, (_, s) in zip(lengths, work, strict=True))  # some stopped at EOS
    handed_off = sum(1 for i in range(len(work)) if decode.tokens(f"r{i}"))
    assert handed_off >= 6
    if mode == "p2p":
        assert receiver.stats.completed == handed_off
    for engine in (prefill, decode, colocated):
        assert engine.engine.load().blocks_used == 0


@pytest.mark.parametrize("mode", ["p2p", "centralized"])
async def test_a_zero_cost_engine_streams_every_token_at_once_and_equal_to_colocated(
    start: Callable[..., Awaitable[Running]],
    sender: KvSender,
    receiver: KvReceiver,
    broker: KvBroker,
    mode: str,
) -> None:
    """``time_scale`` 0: no modeled time. Each job's tokens come as soon as it runs, in one
    message, and they are the tokens a timed engine produces."""
    zero = SimEngineConfig(time_scale=0.0, mean_output_tokens=1e12)
    timed = SimEngineConfig(time_scale=0.001, mean_output_tokens=1e12)
    prefill, decode = await start(zero, kv_sender=sender), await start(zero, kv_receiver=receiver)
    reference = await start(timed)
    endpoint = receiver.endpoint if mode == "p2p" else broker.endpoint
    sampling = SamplingParams(max_tokens=256, temperature=0.7, seed=3)
    prompts = {f"z{i}": list(range(i, i + 40 + 7 * i)) for i in range(4)}
    await asyncio.wait_for(
        asyncio.gather(
            *(disaggregated(prefill, decode, rid, p, sampling, mode, endpoint) for rid, p in prompts.items()),
            *(reference.engine.generate(GenerateJob(rid, p, sampling, WAIT_S)) for rid, p in prompts.items()),
        ),
        WAIT_S,
    )
    for rid in prompts:
        assert prefill.tokens(rid) + decode.tokens(rid) == reference.tokens(rid)
        assert len(decode.tokens(rid)) == 255
        batches = [m for m in decode.sent if isinstance(m, TokenOutput) and m.request_id == rid]
        assert len(batches) == 1  # all 255 at once: nothing to wait for


async def test_the_handoff_moves_a_stand_in_and_models_the_real_kv_bytes(
    start: Callable[..., Awaitable[Running]], sender: KvSender, receiver: KvReceiver
) -> None:
    config = SimEngineConfig(time_scale=0.001, model="llama-2-70b", tp=4, mean_output_tokens=1e12)
    prefill = await start(config, kv_sender=sender)
    decode = await start(config, kv_receiver=receiver)
    prompt = list(range(200))
    await disaggregated(prefill, decode, "x", prompt, SamplingParams(max_tokens=5), "p2p", receiver.endpoint)
    assert len(decode.tokens("x")) == 4
    kv_bytes = prefill.engine.info().kv_bytes_per_token
    assert kv_bytes == 2 * 80 * 8 * 128 * 2  # Llama-2-70B: 320 KiB per token
    assert prefill.engine.link.bytes_modeled == 200 * kv_bytes
    assert receiver.stats.completed == 1


async def test_load_reports_running_requests_and_cancel_frees_their_blocks(
    start: Callable[..., Awaitable[Running]],
) -> None:
    slow = SimEngineConfig(time_scale=1.0, mean_output_tokens=1e12)
    g = await start(slow)
    prompts = {f"r{i}": [i] * (100 + 50 * i) for i in range(3)}
    jobs = {
        rid: asyncio.create_task(
            g.engine.generate(GenerateJob(rid, p, SamplingParams(max_tokens=5000), WAIT_S))
        )
        for rid, p in prompts.items()
    }
    await wait_until(lambda: all(len(g.tokens(rid)) >= 2 for rid in prompts), WAIT_S)  # all three decode
    load = g.engine.load()
    assert load.running == 3
    prompt_blocks = sum(-(-len(p) // 16) for p in prompts.values())
    assert load.blocks_used >= prompt_blocks
    assert load.blocks_total == g.engine.info().capacity_blocks
    assert load.waiting == 0
    for job in jobs.values():  # the agent cancels a job by cancelling its task
        job.cancel()
    for job in jobs.values():
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(job, WAIT_S)
    load = g.engine.load()
    assert load.blocks_used == 0 and load.running == 0
    # What the prompts computed stays in the prefix cache as reusable space.
    assert load.cached_blocks == sum(len(p) // 16 for p in prompts.values())


async def test_a_cancelled_decode_reservation_makes_room_for_the_next(
    start: Callable[..., Awaitable[Running]], receiver: KvReceiver
) -> None:
    d = await start(SimEngineConfig(time_scale=0.001, num_blocks=20), kv_receiver=receiver)
    prompt = list(range(200))  # 13 blocks with token 0
    first = asyncio.create_task(
        d.engine.decode(
            DecodeJob("a", prompt, SamplingParams(max_tokens=9), KvRoute(KvMode.P2P, "", "ta"), WAIT_S)
        )
    )
    await wait_until(lambda: d.engine.load().blocks_used == 13, WAIT_S)
    with pytest.raises(PdorchError) as e:
        await d.engine.decode(
            DecodeJob("b", prompt, SamplingParams(max_tokens=9), KvRoute(KvMode.P2P, "", "tb"), WAIT_S)
        )
    assert e.value.code is ErrorCode.OUT_OF_BLOCKS
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(first, WAIT_S)
    assert d.engine.load().blocks_used == 0
    second = asyncio.create_task(
        d.engine.decode(
            DecodeJob("b", prompt, SamplingParams(max_tokens=9), KvRoute(KvMode.P2P, "", "tb"), WAIT_S)
        )
    )
    await wait_until(lambda: d.engine.load().blocks_used == 13, WAIT_S)
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(second, WAIT_S)


async def test_concurrent_requests_share_decode_steps(start: Callable[..., Awaitable[Running]]) -> None:
    g = await start(SimEngineConfig(time_scale=0.05, mean_output_tokens=1e12))
    n, max_tokens = 8, 100
    await asyncio.wait_for(
        asyncio.gather(
            *(
                g.engine.generate(
                    GenerateJob(f"r{i}", [i + 1] * 50, SamplingParams(max_tokens=max_tokens), WAIT_S)
                )
                for i in range(n)
            )
        ),
        WAIT_S,
    )
    stats = g.engine.stats
    assert all(len(g.tokens(f"r{i}")) == max_tokens for i in range(n))
    assert stats.tokens == n * (max_tokens - 1)
    # Continuous batching: decode iterations advance many requests at once.
    assert stats.peak_running >= 2
    assert stats.decode_iterations < stats.tokens


async def test_outputs_are_deterministic_across_engines_and_runs(
    start: Callable[..., Awaitable[Running]],
) -> None:
    a, b = await start(), await start()
    c = await start(SimEngineConfig(time_scale=0.001, mean_output_tokens=20, seed=1))
    job = GenerateJob(
        "same", list(b"deterministic"), SamplingParams(max_tokens=60, temperature=0.7, seed=4), WAIT_S
    )
    for engine in (a, b, c):
        await asyncio.wait_for(engine.engine.generate(job), WAIT_S)
    assert a.tokens("same") == b.tokens("same")
    assert a.tokens("same") != c.tokens("same")  # the engine seed is part of the "weights"
    await asyncio.wait_for(a.engine.generate(job), WAIT_S)  # the id is free again once finished
    assert a.tokens("same") == b.tokens("same") * 2


async def test_kv_of_another_prompt_is_refused(
    start: Callable[..., Awaitable[Running]], sender: KvSender, receiver: KvReceiver
) -> None:
    prefill = await start(kv_sender=sender)
    decode = await start(kv_receiver=receiver)
    sampling = SamplingParams(max_tokens=10, ignore_eos=True)
    route = KvRoute(KvMode.P2P, receiver.endpoint, "mixed-up")
    decoding = asyncio.create_task(
        decode.engine.decode(
            DecodeJob("r", [1, 2, 3] * 20, sampling, KvRoute(KvMode.P2P, "", "mixed-up"), WAIT_S)
        )
    )
    with pytest.raises(PdorchError):
        await prefill.engine.prefill(PrefillJob("r", [4, 5, 6] * 20, sampling, route, WAIT_S))
    with pytest.raises(PdorchError) as e:
        await asyncio.wait_for(decoding, WAIT_S)
    assert e.value.code is ErrorCode.KV_CORRUPT
    assert not any(isinstance(m, KvLoaded) for m in decode.sent)
    assert decode.engine.load().blocks_used == 0 and prefill.engine.load().blocks_used == 0


async def test_a_handoff_its_link_cannot_start_before_the_deadline_fails_without_opening(
    sender: KvSender, receiver: KvReceiver
) -> None:
    """The modeled link is booked far beyond the transfer's deadline (a slow link already busy):
    KV_TIMEOUT at once, and the receiver never sees a begin it would have to park."""
    link = KvLink(gbytes_per_s=1.0, time_scale=1.0)
    link.book(time.monotonic(), 10**12)  # busy for ~1,000 s
    with pytest.raises(PdorchError) as e:
        await asyncio.wait_for(
            send_standin(
                sender,
                KvRoute(KvMode.P2P, receiver.endpoint, "late"),
                [1, 2, 3],
                7,
                num_layers=1,
                block_size=16,
                modeled_bytes=1000,
                link=link,
                deadline_s=60.0,
            ),
            WAIT_S,
        )
    assert e.value.code is ErrorCode.KV_TIMEOUT
    await asyncio.sleep(0.2)
    assert receiver.stats.parked == 0 and receiver.stats.refused_begins == 0


async def test_a_job_past_its_deadline_fails_and_frees_what_it_held(
    start: Callable[..., Awaitable[Running]],
) -> None:
    """Modeled in real time, a long prompt's prefill outlasts a 50 ms deadline: DEADLINE_EXCEEDED,
    and the engine keeps none of its blocks."""
    slow = await start(SimEngineConfig(time_scale=1.0, mean_output_tokens=20))
    job = PrefillJob("late", [7] * 3000, SamplingParams(max_tokens=5), None, 0.05)
    with pytest.raises(PdorchError) as e:
        await asyncio.wait_for(slow.engine.prefill(job), WAIT_S)
    assert e.value.code is ErrorCode.DEADLINE_EXCEEDED and "prefill of late" in e.value.message
    assert slow.engine.load().blocks_used == 0


async def test_info_health_and_missing_kv_plane(start: Callable[..., Awaitable[Running]]) -> None:
    g = await start(SimEngineConfig(accelerator="a100", model="llama-3-8b", tp=2, model_name="served"))
    info = g.engine.info()
    assert (info.engine, info.model, info.tokenizer, info.vocab_size, info.eos_token_id) == (
        "sim",
        "served",
        "byte",
        260,
        257,
    )
    assert info.block_size == 16 and info.max_model_len == 8192
    # 2 x 80 GB at 90% minus 16 GB of weights, at 128 KiB per token.
    assert info.capacity_blocks == int((2 * 80e9 * 0.9 - 8.03e9 * 2) // (128 * 1024)) // 16
    assert await g.engine.healthy()
    sampling = SamplingParams(max_tokens=4)
    with pytest.raises(PdorchError) as e:
        await g.engine.prefill(
            PrefillJob("p", [1], sampling, KvRoute(KvMode.P2P, "tcp://127.0.0.1:9", "t"), WAIT_S)
        )
    assert e.value.code is ErrorCode.JOB_FAILED
    with pytest.raises(PdorchError) as e:
        await g.engine.decode(DecodeJob("d", [1], sampling, KvRoute(KvMode.P2P, "", "t"), WAIT_S))
    assert e.value.code is ErrorCode.JOB_FAILED
    with pytest.raises(PdorchError) as e:
        await g.engine.generate(GenerateJob("g", [1] * 9000, sampling, WAIT_S))
    assert e.value.code is ErrorCode.PROMPT_TOO_LONG
    await g.engine.close()
    assert not await g.engine.healthy()


async def test_bad_settings_are_config_errors() -> None:
    for bad in (
        {"time_scale": -1.0},
        {"time_scale": float("inf")},
        {"model": "gpt-9"},
        {"kv_link_gbytes_per_s": -1.0},
        {"mean_output_tokens": 0.5},
    ):
        with pytest.raises(PdorchError) as e:
            SimEngineConfig(**bad)  # type: ignore[arg-type]
        assert e.value.code is ErrorCode.CONFIG
    with pytest.raises(PdorchError) as e:
        SimulatedEngine(SimEngineConfig(accelerator="tpu"))
    assert e.value.code is ErrorCode.CONFIG
