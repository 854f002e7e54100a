"""LoRA adapters through the reference engine's jobs, with the KV crossing a real KV plane: the
prefill and decode workers that share an adapter continue each other exactly, and a decode worker
whose adapter of that name holds other weights refuses the KV instead of decoding garbage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zmq.asyncio

from tests.support.lora import write_adapter
from tests.support.reference_core import CFG, random_prompt
from tests.support.security import INSECURE
from transport.errors import ErrorCode, PdorchError
from transport.kv import KvReceiver, KvSender
from transport.messages import DecodeJob, FromWorker, GenerateJob, KvMode, KvRoute, PrefillJob, SamplingParams
from workers.engines.reference.engine import ReferenceEngine

WAIT_S = 60.0
SAMPLING = SamplingParams(max_tokens=10, temperature=0.8, seed=3, ignore_eos=True)


@pytest.fixture
async def receiver(ctx: zmq.asyncio.Context) -> AsyncIterator[KvReceiver]:
    rx = KvReceiver(ctx, security=INSECURE, bind="tcp://127.0.0.1:0", park_s=5.0)
    await rx.start()
    yield rx
    await rx.close()


def _tokens(sent: list[FromWorker], rid: str) -> list[int]:
    return [t for m in sent if getattr(m, "request_id", None) == rid for t in getattr(m, "token_ids", [])]


async def _started(engines: list[ReferenceEngine], engine: ReferenceEngine) -> list[FromWorker]:
    sent: list[FromWorker] = []
    await engine.start(sent.append)
    engines.append(engine)
    return sent


async def test_an_adapter_request_is_split_and_continued_exactly(
    tmp_path: Path, sender: KvSender, receiver: KvReceiver
) -> None:
    sql = {"sql": str(write_adapter(tmp_path / "sql", CFG, seed=1))}
    engines: list[ReferenceEngine] = []
    try:
        prefill = ReferenceEngine(CFG, kv_sender=sender, adapters=sql)
        decode = ReferenceEngine(CFG, kv_receiver=receiver, adapters=sql)
        colocated = ReferenceEngine(CFG, adapters=sql)
        assert decode.info().adapters == ("sql",)
        out_p, out_d, out_c = [await _started(engines, e) for e in (prefill, decode, colocated)]
        prompt = random_prompt(40, seed=2)
        for adapter in ("sql", ""):
            rid = f"r-{adapter}"
            route = KvRoute(KvMode.P2P, receiver.endpoint, f"t-{rid}")
            decoding = asyncio.create_task(
                decode.decode(DecodeJob(rid, prompt, SAMPLING, route, WAIT_S, adapter=adapter))
            )
            await prefill.prefill(PrefillJob(rid, prompt, SAMPLING, route, WAIT_S, adapter=adapter))
            await asyncio.wait_for(decoding, WAIT_S)
            await colocated.generate(GenerateJob(rid, prompt, SAMPLING, WAIT_S, adapter=adapter))
            assert _tokens(out_p, rid) + _tokens(out_d, rid) == _tokens(out_c, rid)
        assert _tokens(out_c, "r-sql") != _tokens(out_c, "r-")
    finally:
        for engine in engines:
            await engine.close()


async def test_kv_of_another_adapter_of_the_same_name_is_refused(
    tmp_path: Path, sender: KvSender, receiver: KvReceiver
) -> None:
    engines: list[ReferenceEngine] = []
    try:
        prefill = ReferenceEngine(
            CFG, kv_sender=sender, adapters={"sql": str(write_adapter(tmp_path / "a", CFG, 1))}
        )
        decode = ReferenceEngine(
            CFG, kv_receiver=receiver, adapters={"sql": str(write_adapter(tmp_path / "b", CFG, 2))}
        )
        await _started(engines, prefill)
        await _started(engines, decode)
        prompt = random_prompt(30, seed=4)
        route = KvRoute(KvMode.P2P, receiver.endpoint, "t-x")
        decoding = asyncio.create_task(
            decode.decode(DecodeJob("x", prompt, SAMPLING, route, WAIT_S, adapter="sql"))
        )
        await prefill.prefill(PrefillJob("x", prompt, SAMPLING, route, WAIT_S, adapter="sql"))
        with pytest.raises(PdorchError) as refused:
            await asyncio.wait_for(decoding, WAIT_S)
        assert refused.value.code is ErrorCode.KV_REJECTED
        assert decode.load().blocks_used == 0
    finally:
        for engine in engines:
            await engine.close()
