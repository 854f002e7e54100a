"""The reference engine's KV handoff through shared memory, with the other side killed mid-transfer:
the engine's blocks all come back (those lent to a dead sender with fresh pages), and nothing is
left mapped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import zmq.asyncio

from tests.support.kv import wait_until
from tests.support.same_host import block_fds, blocks_mapped, kill, line_from, peer, rings_mapped
from tests.support.security import INSECURE
from transport.errors import ErrorCode, PdorchError
from transport.kv import KvReceiver, KvSender
from transport.kv.same_host import SameHostMode
from transport.messages import (
    DecodeJob,
    FromWorker,
    GenerateJob,
    KvMode,
    KvRoute,
    PrefillJob,
    SamplingParams,
    TokenOutput,
)
from workers.engines.reference.config import ModelConfig
from workers.engines.reference.engine import ReferenceEngine

CFG = ModelConfig()  # the small random-weight model: rows of (2, 2, 32) float64
PROMPT = [i % 250 for i in range(600)]  # 38 blocks of 16


async def _started(engine: ReferenceEngine) -> ReferenceEngine:
    await engine.start(lambda msg: None)
    return engine


@pytest.fixture
async def receiver(ctx: zmq.asyncio.Context) -> AsyncIterator[KvReceiver]:
    rx = KvReceiver(ctx, security=INSECURE, bind="tcp://127.0.0.1:0", idle_s=1.0, same_host=SameHostMode.ON)
    await rx.start()
    yield rx
    await rx.close()


async def test_decode_gets_its_blocks_back_when_the_sender_dies(receiver: KvReceiver) -> None:
    engine = await _started(ReferenceEngine(CFG, num_blocks=64, kv_receiver=receiver))
    shape = ",".join(map(str, CFG.kv_row_shape))
    args = [
        "--layers",
        str(CFG.layers),
        "--rows",
        str(len(PROMPT)),
        "--row-shape",
        shape,
        "--dtype",
        CFG.dtype,
    ]
    proc = peer("send", receiver.endpoint, "t", SameHostMode.ON, "1", "--hold-after", "2", *args)
    try:
        job = DecodeJob(
            "r", PROMPT, SamplingParams(max_tokens=4), KvRoute(KvMode.P2P, "", "t"), deadline_s=60
        )
        pool_before = block_fds()
        assert len(pool_before) == 64  # the engine's cache: a memfd per block
        decoding = asyncio.create_task(engine.decode(job))
        assert await line_from(proc) == "holding"
        # Reserved, half written: the sender maps the 38 blocks lent to it, nothing else.
        assert engine.load().blocks_used == 38 and len(blocks_mapped(proc.pid)) == 38
        assert rings_mapped(proc.pid) == []
        kill(proc)
        with pytest.raises(PdorchError) as e:
            await decoding
        assert e.value.code == ErrorCode.KV_TRUNCATED
        await wait_until(lambda: engine.load().blocks_used == 0)
        # The lent blocks were retired: new memfds behind 38 of them, the old ones closed.
        pool_after = block_fds()
        assert len(pool_after) == 64
        assert len(set(pool_after.values()) - set(pool_before.values())) == 38
        assert receiver.stats.shared_rings == 0 and rings_mapped() == []
    finally:
        proc.kill()
        proc.wait(60)
        await engine.close()


async def test_prefill_gets_its_blocks_back_when_the_receiver_dies(ctx: zmq.asyncio.Context) -> None:
    sender = KvSender(ctx, security=INSECURE, same_host=SameHostMode.ON)
    engine = await _started(ReferenceEngine(CFG, num_blocks=64, kv_sender=sender))
    proc = peer("receive", SameHostMode.ON)
    try:
        endpoint = await line_from(proc)
        route = KvRoute(KvMode.P2P, endpoint, "t")
        prefilling = asyncio.create_task(
            engine.prefill(PrefillJob("r", PROMPT, SamplingParams(max_tokens=4), route, 20))
        )
        assert await line_from(proc) == "writing"
        assert rings_mapped() and sender.mapped_rings == 1
        kill(proc)
        with pytest.raises(PdorchError) as e:
            await prefilling  # no credit comes back: the job's deadline ends the transfer
        assert e.value.code == ErrorCode.KV_TIMEOUT
        await wait_until(lambda: engine.load().blocks_used == 0)
        assert sender.mapped_rings == 0 and rings_mapped() == []
    finally:
        proc.kill()
        proc.wait(60)
        await engine.close()
        await sender.close()


@pytest.mark.parametrize("mode", [SameHostMode.ON, SameHostMode.OFF])
async def test_a_handoff_on_this_host_is_written_into_the_decode_engines_blocks(
    ctx: zmq.asyncio.Context, mode: SameHostMode
) -> None:
    receiver = KvReceiver(ctx, security=INSECURE, bind="tcp://127.0.0.1:0", same_host=mode)
    sender = KvSender(ctx, security=INSECURE, same_host=mode)
    await receiver.start()
    sampling = SamplingParams(max_tokens=12, temperature=0.8, seed=5, ignore_eos=True)
    outputs: list[list[FromWorker]] = [[], [], []]
    engines = [
        ReferenceEngine(CFG, num_blocks=64, kv_sender=sender),
        ReferenceEngine(CFG, num_blocks=64, kv_receiver=receiver),
        ReferenceEngine(CFG, num_blocks=64),
    ]
    try:
        for engine, sent in zip(engines, outputs, strict=True):
            await engine.start(sent.append)
        prefill, decode, colocated = engines
        route = KvRoute(KvMode.P2P, receiver.endpoint, "t")
        decoding = asyncio.create_task(decode.decode(DecodeJob("r", PROMPT, sampling, route, 60)))
        await prefill.prefill(PrefillJob("r", PROMPT, sampling, route, 60))
        await asyncio.wait_for(decoding, 60)
        await colocated.generate(GenerateJob("r", PROMPT, sampling, 60))
        tokens = [[t for m in sent if isinstance(m, TokenOutput) for t in m.token_ids] for sent in outputs]
        assert tokens[0] + tokens[1] == tokens[2] and len(tokens[2]) == 12
        # Through the blocks the decode engine lent (no ring), or the socket.
        assert receiver.stats.same_host == (mode == SameHostMode.ON) and receiver.stats.shared_rings == 0
        # The decode engine's pool is mapped here; the sender mapped its blocks only during the handoff.
        assert sender.mapped_rings == 0
        assert len(blocks_mapped()) == (64 if mode == SameHostMode.ON else 0)
    finally:
        for engine in engines:
            await engine.close()
        await sender.close()
        await receiver.close()
