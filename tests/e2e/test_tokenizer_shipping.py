"""A scheduler that cannot read a worker's model directory (another pod) still tokenizes exactly as
the worker's engine: the agent ships its tokenizer's files after registering."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pdorch.launcher import LocalCluster
from scheduler.tokenizer.hf import HfTokenizer
from tests.e2e.conftest import start_cluster
from tests.e2e.helpers import eventually
from tests.support.fake_worker import FakeWorker
from transport.messages import Load, PrefillJob, Role, TokenizerFiles

pytestmark = pytest.mark.e2e

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"


def _build_tokenizer(folder: Path) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(
        ["the scheduler ships the tokenizer to the worker and back"] * 50, trainer=trainer
    )
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture
def scheduler_only(tmp_path) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path / "logs", prefill=0, decode=0)
    yield c
    c.stop()


async def test_scheduler_tokenizes_with_the_files_a_worker_sent(
    scheduler_only: LocalCluster, tmp_path
) -> None:
    folder = tmp_path / "tok"
    _build_tokenizer(folder)
    spec = "/models/on/another/pod/tiny"  # what the worker announces; not on the scheduler's disk
    hello = {"model": "tiny", "tokenizer": spec, "vocab_size": 400, "eos_token_id": 1, "engine": "vllm"}
    prefill = FakeWorker(scheduler_only, "p", role=Role.PREFILL, **hello)
    decode = FakeWorker(scheduler_only, "d", role=Role.DECODE, **hello)
    try:
        for w in (prefill, decode):
            w.register()
        files = {n: (folder / n).read_bytes() for n in ("tokenizer.json", "tokenizer_config.json")}
        prefill.send(TokenizerFiles(files))
        # Messages on one connection are handled in order: once this load shows, the files are in.
        prefill.report(Load(blocks_used=7, blocks_total=4096))
        await eventually(lambda: _blocks_used(scheduler_only, "p") == 7, 10)
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "ships the tokenizer"}],
            "max_tokens": 4,
        }
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            request = asyncio.create_task(s.post(scheduler_only.url + "/v1/chat/completions", json=body))
            try:
                job = await asyncio.to_thread(prefill.recv_until, PrefillJob)
            finally:
                request.cancel()
                with contextlib.suppress(BaseException):
                    await request
    finally:
        prefill.close()
        decode.close()
    want = HfTokenizer(folder).apply_chat_template([("user", "ships the tokenizer")])
    assert job.prompt_token_ids.tolist() == want
    assert max(want) >= 256  # merged BPE tokens: not the byte tokenizer by accident


def _blocks_used(cluster: LocalCluster, worker_id: str) -> int | None:
    workers = {w["worker_id"]: w for w in cluster.cluster_state()["workers"]}
    return workers.get(worker_id, {}).get("load", {}).get("blocks_used")
