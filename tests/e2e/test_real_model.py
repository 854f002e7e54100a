"""The default model (SmolLM2-135M-Instruct, real weights) on the reference engine, through real
processes: it answers in English with its own tokenizer and chat template, and disaggregated output
equals colocated output token for token in both KV modes, greedy and seeded.

Fewer and shorter requests than the random-weight suite (``test_equality.py``): a real model's
steps cost ~100x more.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from pdorch.launcher import LocalCluster
from scheduler.tokenizer.hf import HfTokenizer
from tests.e2e.conftest import start_cluster
from tests.e2e.helpers import gather_limited, metric
from tests.support.real_model import default_model_dir
from workers.models.catalog import DEFAULT_MODEL

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

GREEDY = {"temperature": 0.0}
SEEDED = {"temperature": 0.8, "top_p": 0.95}

# (endpoint, body): chats use the model's chat template, completions its plain tokenizer.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("chat", {"messages": [{"role": "user", "content": "What is the capital of France?"}], **GREEDY}),
    (
        "chat",
        {
            "messages": [
                {"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "Name three colors."},
            ],
            "seed": 11,
            **SEEDED,
        },
    ),
    (
        "chat",
        {"messages": [{"role": "user", "content": "Write one sentence about the sea."}], "seed": 3, **SEEDED},
    ),
    ("completion", {"prompt": "The capital of Germany is", **GREEDY}),
    ("completion", {"prompt": "Once upon a time, there was a little girl who", "seed": 7, **SEEDED}),
    # Several KV blocks (16 tokens each) and a prefix shared with the previous prompt.
    (
        "completion",
        {"prompt": "Once upon a time, there was a little girl who " + "lived by a river. " * 12, **GREEDY},
    ),
]


@pytest.fixture(scope="module")
def model() -> None:
    default_model_dir()


def _cluster(factory: pytest.TempPathFactory, name: str, **spec: object) -> Iterator[LocalCluster]:
    cluster = start_cluster(factory.mktemp(name), model=DEFAULT_MODEL, **spec)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def colocated(model: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from _cluster(tmp_path_factory, "real-colocated", colocated=True)


@pytest.fixture(scope="module")
def p2p(model: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from _cluster(tmp_path_factory, "real-p2p", kv_mode="p2p")


@pytest.fixture(scope="module")
def centralized(model: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from _cluster(tmp_path_factory, "real-centralized", kv_mode="centralized")


async def _ask(
    session: aiohttp.ClientSession, url: str, endpoint: str, body: dict[str, Any]
) -> dict[str, Any]:
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    payload = {"model": DEFAULT_MODEL, "max_tokens": 20, "return_token_ids": True, **body}
    async with session.post(url + path, json=payload) as r:
        data = await r.json()
        assert r.status == 200, data
        return data["choices"][0]


def _text(choice: dict[str, Any]) -> str:
    return choice["message"]["content"] if "message" in choice else choice["text"]


async def _run_all(url: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
        return await gather_limited([_ask(s, url, e, b) for e, b in CASES], limit=6)


@pytest.fixture(scope="module")
def expected(colocated: LocalCluster) -> list[dict[str, Any]]:
    return asyncio.run(_run_all(colocated.url))


ENGLISH_WORDS = {"the", "a", "and", "to", "of", "with", "her", "she", "was", "is", "in", "it"}


def _looks_english(text: str) -> bool:
    """Mostly letters, spaces and punctuation, with a few of the commonest English words."""
    plain = sum(c.isascii() and (c.isalpha() or c in " .,;:'!?-\n") for c in text)
    words = set(re.findall(r"[a-z]+", text.lower()))
    return plain >= 0.9 * len(text) and len(words & ENGLISH_WORDS) >= 3


async def test_the_default_model_answers_in_english(colocated: LocalCluster) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
        france = await _ask(s, colocated.url, "chat", CASES[0][1])
        germany = await _ask(s, colocated.url, "completion", CASES[3][1])
        story = await _ask(s, colocated.url, "completion", {**CASES[4][1], "max_tokens": 32})
    assert "Paris" in _text(france) and france["finish_reason"] == "stop", france
    assert "Berlin" in _text(germany), germany
    assert _looks_english(_text(story)), _text(story)


@pytest.mark.parametrize("mode", ["p2p", "centralized"])
async def test_disaggregated_equals_colocated_on_the_real_model(
    mode: str, expected: list[dict[str, Any]], request: pytest.FixtureRequest
) -> None:
    cluster = request.getfixturevalue(mode)
    got = await _run_all(cluster.url)
    for (endpoint, body), want, have in zip(CASES, expected, got, strict=True):
        assert have["token_ids"] == want["token_ids"], (endpoint, body)
        assert (_text(have), have["finish_reason"]) == (_text(want), want["finish_reason"])
    assert {w["role"] for w in cluster.cluster_state()["workers"]} == {"prefill", "decode"}
    # Greedy and seeded both ran, and both to some length.
    assert all(len(w["token_ids"]) >= 5 for w in expected)


async def test_megabytes_of_prompt_are_refused_before_they_are_tokenized(p2p: LocalCluster) -> None:
    """7 MB of text takes a core seconds to tokenize, during which the scheduler would serve
    nobody, heartbeats included: such a prompt cannot fit the model, and is refused as too long
    before any of that work, on each path that tokenizes. Text long enough to go to a thread is
    tokenized as the model's tokenizer does."""
    huge = "All work and no play makes Jack a dull boy. " * 160_000
    bodies = [
        ("/v1/completions", {"prompt": huge, "max_tokens": 4}),
        ("/v1/completions", {"prompt": ["hi", huge], "max_tokens": 4}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": huge}], "max_tokens": 4}),
        ("/tokenize", {"prompt": huge}),
    ]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        dropped = await metric(s, p2p.url, "pdorch_workers_dropped")
        for path, body in bodies:
            async with s.post(p2p.url + path, json={"model": DEFAULT_MODEL, **body}) as r:
                data = await r.json()
            assert r.status == 400 and data["error"]["code"] == "prompt_too_long", (path, data)
            assert "more than" in data["error"]["message"]
        long = "The sea was calm that night, and the stars were out. " * 400  # over 16k characters
        async with s.post(p2p.url + "/tokenize", json={"model": DEFAULT_MODEL, "prompt": long}) as r:
            tokens = (await r.json())["tokens"]
        assert tokens == HfTokenizer(default_model_dir()).encode(long)
        assert await metric(s, p2p.url, "pdorch_workers_dropped") == dropped
