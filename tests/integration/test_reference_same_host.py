"""The reference engine's KV handoff through shared memory, with the other side killed mid-transfer:
the engine's blocks all come back, and no ring is left mapped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import zmq.asyncio

from tests.support.kv import wait_until
from tests.support.same_host import kill, line_from, peer, rings_mapped
from tests.support.security import INSECURE
from transport.errors import ErrorCode, PdorchError
from transport.kv import KvReceiver, KvSender
from transport.kv.same_host import SameHostMode
from transport.messages import DecodeJob, KvMode, KvRoute, PrefillJob, SamplingParams
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
        decoding = asyncio.create_task(engine.decode(job))
        assert await line_from(proc) == "holding"
        assert engine.load().blocks_used == 38 and rings_mapped(proc.pid)  # reserved, half written
        kill(proc)
        with pytest.raises(PdorchError) as e:
            await decoding
        assert e.value.code == ErrorCode.KV_TRUNCATED
        await wait_until(lambda: engine.load().blocks_used == 0)
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
