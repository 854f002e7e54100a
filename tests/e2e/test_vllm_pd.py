"""Real vLLM on CPU, disaggregated through pdorch's KV connector, equals colocated vLLM.

Two vLLM server processes (a tiny Llama built here): a KV producer (prefill) and a KV consumer
(decode) with the pdorch connector, plus a pdorch KV broker for centralized mode. The engine
adapter drives them exactly as a worker agent does. Colocated reference outputs come from the
prefill instance serving plain requests (it is an ordinary vLLM for requests without pdorch
``kv_transfer_params``), run before any disaggregated request.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from pdorch.launcher import LocalCluster, free_port
from scheduler.tokenizer.hf import HfTokenizer
from tests.support.tcp_proxy import TcpProxy
from tests.vllm_support.environment import build_tiny_model, vllm_python
from tests.vllm_support.pd_pair import (
    Cluster,
    Engines,
    check_equality,
    colocated,
    disaggregated,
    pd_engines,
    pd_servers,
    pdorch_in_front,
    route,
)
from transport.errors import PdorchError
from transport.kv.arrival_watch import ARRIVING_EVERY_S
from transport.messages import (
    DecodeJob,
    KvMode,
    PrefillJob,
    SamplingParams,
    TokenOutput,
)
from workers.engines.vllm.engine import VllmEngine
from workers.engines.vllm.metrics import parse_metrics

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

TEXTS = [
    "hello",
    "the cache block token",
    "please write a short story about a cat and a river at night",
    "def return import class if else while for print None True False " * 3,
    "café naïve über 東京 こんにちは 🙂 " * 4,
    "prefill decode worker scheduler request latency throughput memory kernel tensor " * 6,
    "one two three four five six seven eight nine ten " * 14,
    "please write a short story about a cat, a dog and a river. " * 26,  # 417 tokens, 14 blocks
]
CHATS = [
    [("user", "hello, how are you today?")],
    [("system", "be brief"), ("user", "write a poem about coffee and tea")],
    [("user", "how many blocks does the cache hold?"), ("assistant", "many"), ("user", "how many exactly?")],
    [("user", "morning city mountain " * 20)],
]


MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    python = vllm_python()
    work = tmp_path_factory.mktemp("vllm")
    model_dir = build_tiny_model(python, work)
    # These tests put a proxy on the TCP KV path (and test_vllm_real_model covers the same-host one).
    # Half the equality requests send their decode only once the prefill returned, so the begin
    # waits for it unannounced (pd_servers' patient limits keep it up to the jobs' deadline).
    spec = {"max_num_seqs": 16, "served_model_name": MODEL, "kv_same_host": "off"}
    with pd_servers(python, model_dir, work, **spec) as pair:
        tok = HfTokenizer(model_dir)
        pair.prompts = [tok.encode(t) for t in TEXTS] + [tok.apply_chat_template(c) for c in CHATS]
        yield pair


@pytest.fixture
async def engines(cluster: Cluster) -> AsyncIterator[Engines]:
    async with pd_engines(cluster) as e:
        yield e


async def _check_equality(cluster: Cluster, e: Engines, s: SamplingParams, tag: str, mode: str) -> None:
    assert len({len(p) for p in cluster.prompts}) >= 10, "prompts of varied lengths"
    assert max(len(p) for p in cluster.prompts) > 3 * 32, "prompts spanning several KV blocks"
    await check_equality(cluster, e, s, tag, mode)


async def test_a_resumed_greedy_request_continues_with_the_uninterrupted_tokens(
    cluster: Cluster, engines: Engines
) -> None:
    """What the scheduler sends when a worker died mid-request: the prompt plus the tokens already
    streamed, ``generated`` = their number. Greedy, vLLM continues exactly (docs/vllm.md says why a
    seeded request cannot)."""
    s = SamplingParams(max_tokens=20, ignore_eos=True)
    for i, prompt in enumerate(cluster.prompts[:4]):
        full = await colocated(engines.prefill, engines.p_out, f"resume-c{i}", prompt, s)
        assert len(full) == 20
        for cut in (1, 7):
            rid = f"resume-{i}-{cut}"
            rest = await disaggregated(
                engines,
                rid,
                prompt + full[:cut],
                s,
                route("p2p", cluster, rid),
                decode_first=True,
                generated=cut,
            )
            assert rest == full[cut:], f"prompt {i} resumed at {cut}"


@pytest.mark.parametrize("mode", ["p2p", "centralized"])
async def test_greedy_disaggregated_equals_colocated(cluster: Cluster, engines: Engines, mode: str) -> None:
    await _check_equality(cluster, engines, SamplingParams(max_tokens=24), "greedy", mode)


async def test_seeded_sampling_disaggregated_equals_colocated(cluster: Cluster, engines: Engines) -> None:
    s = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234)
    await _check_equality(cluster, engines, s, "seeded", "p2p")


async def test_corrupted_kv_transfer_fails_the_decode(cluster: Cluster, engines: Engines) -> None:
    proxy = TcpProxy(free_port(), int(cluster.kv_endpoint.rsplit(":", 1)[1]))
    await proxy.start()
    try:
        prompt = max(cluster.prompts, key=len)  # many blocks: bulk frames to damage
        s = SamplingParams(max_tokens=8)
        # Through the proxy undamaged: the path itself works.
        route = cluster.route(KvMode.P2P, "proxy-ok", proxy.endpoint)
        ok = await disaggregated(engines, "proxy-ok", prompt, s, route, decode_first=True)
        assert len(ok) == 8
        proxy.mode = "corrupt"
        route = cluster.route(KvMode.P2P, "proxy-bad", proxy.endpoint)
        with pytest.raises(PdorchError):
            await disaggregated(engines, "proxy-bad", prompt, s, route, decode_first=True)
        assert proxy.damaged > 0
        assert engines.d_out.tokens["proxy-bad"] == [], "no token may come from damaged KV"
        assert "proxy-bad" not in engines.d_out.kv_loaded
    finally:
        await proxy.close()


async def test_a_handoff_over_a_slow_link_is_told_while_its_kv_arrives(
    cluster: Cluster, engines: Engines
) -> None:
    """The KV crosses a link of ~50 kB/s (seconds for the longest prompt): the decode server's
    connector tells its agent that the KV is arriving, and the agent says so (``KvArriving``)
    before the KV is loaded, which keeps the scheduler from taking the handoff for stalled."""
    proxy = TcpProxy(free_port(), int(cluster.kv_endpoint.rsplit(":", 1)[1]))
    proxy.mode = "slow"
    await proxy.start()
    try:
        prompt = max(cluster.prompts, key=len)
        s = SamplingParams(max_tokens=8)
        route = cluster.route(KvMode.P2P, "slow-link", proxy.endpoint)
        started = time.monotonic()
        tokens = await disaggregated(engines, "slow-link", prompt, s, route, decode_first=True)
        assert len(tokens) == 8
        assert time.monotonic() - started > 2 * ARRIVING_EVERY_S, "the link was not slow"
    finally:
        await proxy.close()
    said = [type(m).__name__ for m in engines.d_out.order if getattr(m, "request_id", "") == "slow-link"]
    assert "KvArriving" in said, said
    assert said.index("KvArriving") < said.index("KvLoaded"), said
    assert "KvArriving" not in said[said.index("KvLoaded") :], "nothing once the KV is in place"


async def test_missing_kv_fails_the_decode_instead_of_recomputing(cluster: Cluster, engines: Engines) -> None:
    prompt = cluster.prompts[3]
    route = cluster.route(KvMode.P2P, "never-sent")
    with pytest.raises(PdorchError):
        await engines.decode.decode(
            DecodeJob("lost", prompt, SamplingParams(max_tokens=4), route, deadline_s=5)
        )
    assert engines.d_out.tokens["lost"] == []


async def _wait_for(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_prefill_blocks_are_leased_then_released_when_nobody_takes_the_kv(
    cluster: Cluster, engines: Engines
) -> None:
    await _wait_for(lambda: engines.prefill.load().blocks_used == 0, 60, "an idle prefill instance")
    dead_end = cluster.route(KvMode.P2P, "nobody-listens", f"tcp://127.0.0.1:{free_port()}")
    prompt = cluster.prompts[5]
    await engines.prefill.prefill(
        PrefillJob("orphan", prompt, SamplingParams(max_tokens=4), dead_end, deadline_s=15)
    )
    assert len(engines.p_out.tokens["orphan"]) == 1
    # The request is over, but its blocks stay leased while the send waits for a taker...
    await _wait_for(lambda: engines.prefill.load().blocks_used > 0, 10, "leased blocks to show")
    # ...and are released when the lease ends: never stranded.
    await _wait_for(lambda: engines.prefill.load().blocks_used == 0, 90, "the lease to end")


async def test_a_decode_waiting_for_its_kv_shows_in_the_load_and_cancels_cleanly(
    cluster: Cluster, engines: Engines
) -> None:
    """A decode whose KV has not come is parked inside vLLM holding its blocks; cancelling the job
    aborts it there, the connector ends the load, and vLLM frees the blocks."""
    await _wait_for(lambda: engines.decode.load().blocks_used == 0, 60, "an idle decode instance")
    route = cluster.route(KvMode.P2P, "parked-never-sent")
    s = SamplingParams(max_tokens=8)
    job = asyncio.create_task(
        engines.decode.decode(DecodeJob("parked", cluster.prompts[6], s, route, deadline_s=120))
    )
    load = engines.decode.load
    await _wait_for(
        lambda: load().waiting >= 1 and load().blocks_used > 0, 60, "the parked request in the load"
    )
    job.cancel()  # how the agent cancels a job
    with pytest.raises(asyncio.CancelledError):
        await job
    await _wait_for(
        lambda: load().waiting == 0 and load().blocks_used == 0, 60, "vLLM to drop it and free its blocks"
    )
    assert engines.d_out.tokens["parked"] == []


async def test_info_comes_from_the_live_server(cluster: Cluster, engines: Engines) -> None:
    info = engines.decode.info()
    assert info.engine == "vllm" and info.block_size == 32 and info.capacity_blocks > 0
    assert info.kv_endpoint == cluster.kv_endpoint
    assert info.tokenizer == str(cluster.model_dir)
    assert info.eos_token_id == HfTokenizer(cluster.model_dir).eos_token_id
    assert info.kv_bytes_per_token == 2 * 2 * 2 * 32 * 4  # K+V x layers x kv heads x head dim x fp32
    assert info.max_model_len == 512
    assert info.vocab_size == HfTokenizer(cluster.model_dir).vocab_size
    with urllib.request.urlopen(cluster.decode.url + "/metrics", timeout=10) as resp:
        page = parse_metrics(resp.read().decode())
    assert (page.num_blocks, page.block_size) == (info.capacity_blocks, 32)


def test_each_server_keeps_its_ipc_sockets_in_its_own_directory(cluster: Cluster) -> None:
    """Not in the system's temp directory, where vLLM leaves them behind (they go with the
    directory when the server stops: tests/integration/test_vllm_ipc_dir.py)."""
    for server in (cluster.prefill, cluster.decode):
        assert any(p.is_socket() for p in server.rpc_dir.iterdir()), server.name


async def test_health() -> None:
    gone = VllmEngine(f"http://127.0.0.1:{free_port()}", startup_timeout_s=0.1)
    with pytest.raises(PdorchError):
        await gone.start(lambda msg: None)
    assert await gone.healthy() is False
    await gone.close()


async def test_live_server_is_healthy(engines: Engines) -> None:
    assert await engines.prefill.healthy() is True
    assert await engines.decode.healthy() is True


# ----------------------------------------------------------------------------- the whole stack


@pytest.fixture(scope="module", params=["p2p", "centralized"])
def stack(
    cluster: Cluster, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    """pdorch's scheduler and two worker agents (``pdorch worker --engine vllm``) in front of the
    two vLLM servers, in one KV mode."""
    with pdorch_in_front(cluster, request.param, tmp_path_factory.mktemp(f"stack-{request.param}")) as stack:
        yield stack


def _text(text: str) -> str:
    """The random tiny model can end on an incomplete UTF-8 sequence: vLLM drops it, pdorch ends
    the stream with U+FFFD (as a one-shot decode does). Everything before it must agree."""
    return text.rstrip("\ufffd")


async def _post(session: aiohttp.ClientSession, url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with session.post(url + path, json={"model": MODEL, **body}) as resp:
        data = await resp.json()
        assert resp.status == 200, data
        return data


async def test_pdorch_serves_vllm_disaggregated_like_vllm_colocated(
    cluster: Cluster, stack: LocalCluster
) -> None:
    """Through pdorch's HTTP API: its tokenizer and chat template, its placement, two agents and the
    connector, the answers equal plain vLLM's own answers to the same requests."""
    greedy = {"max_tokens": 16, "temperature": 0.0}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for text in TEXTS:
            body = {"prompt": text, "return_token_ids": True, **greedy}
            want = (await _post(session, cluster.prefill.url, "/v1/completions", body))["choices"][0]
            have = (await _post(session, stack.url, "/v1/completions", body))["choices"][0]
            assert have["token_ids"] == want["token_ids"], text
            assert _text(have["text"]) == _text(want["text"])
        for chat in CHATS:
            body = {"messages": [{"role": r, "content": c} for r, c in chat], **greedy}
            want = (await _post(session, cluster.prefill.url, "/v1/chat/completions", body))["choices"][0]
            have = (await _post(session, stack.url, "/v1/chat/completions", body))["choices"][0]
            assert _text(have["message"]["content"]) == _text(want["message"]["content"]), chat
            assert have["finish_reason"] == want["finish_reason"]


@pytest.mark.parametrize("mode", ["p2p", "centralized"])
async def test_logprobs_penalties_and_bias_pass_through_and_agree(
    cluster: Cluster, engines: Engines, mode: str
) -> None:
    """vLLM computes them; pdorch passes the parameters and reads the logprobs back by token id.
    Disaggregated equals colocated: the same tokens, logprobs within float32 noise."""
    s = SamplingParams(
        max_tokens=10,
        logprobs=2,
        prompt_logprobs=1,
        presence_penalty=0.8,
        repetition_penalty=1.2,
        logit_bias={7: -100.0},
    )
    for i, prompt in enumerate(cluster.prompts[:3]):
        want = await colocated(engines.prefill, engines.p_out, f"lp-c{i}", prompt, s)
        rid = f"lp-{mode}{i}"
        got = await disaggregated(engines, rid, prompt, s, route(mode, cluster, rid), decode_first=True)
        assert got == want and 7 not in got
        c_msgs = [m for m in engines.p_out.order if isinstance(m, TokenOutput) and m.request_id == f"lp-c{i}"]
        p_msgs = [m for m in engines.p_out.order if isinstance(m, TokenOutput) and m.request_id == rid]
        d_msgs = [m for m in engines.d_out.order if isinstance(m, TokenOutput) and m.request_id == rid]
        want_lps = [lp for m in c_msgs for lp in m.logprobs]
        got_lps = [lp for m in p_msgs + d_msgs for lp in m.logprobs]
        assert len(want_lps) == len(got_lps) == len(want)
        for a, b in zip(want_lps, got_lps, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-3) and len(b.top_ids) == 2
        prompt_lps = [lp for m in p_msgs for lp in m.prompt_logprobs]
        assert len(prompt_lps) == len(prompt) - 1 and all(lp.logprob <= 0 for lp in prompt_lps)
