"""What real clients and evaluation harnesses ask for, through the official `openai` client:
logprobs, echo with prompt logprobs, penalties, logit bias, min_tokens, stop_token_ids, max_tokens
against the context. Each must give, disaggregated in both KV modes, exactly what a colocated
worker gives (logprobs included), streamed or not."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest

from tests.e2e.helpers import MODEL, metric

pytestmark = pytest.mark.e2e

EOS = 257  # the reference model's
PROMPT = "Once upon a time, in a land far away"


def _client(cluster: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _completion(cluster: Any, **body: Any) -> Any:
    return _client(cluster).completions.create(**{"model": MODEL, "prompt": PROMPT, **body})


CASES = {
    "logprobs-greedy": {"max_tokens": 12, "temperature": 0, "logprobs": 3},
    "logprobs-seeded": {"max_tokens": 12, "temperature": 0.9, "seed": 4, "logprobs": 2},
    "penalties": {
        "max_tokens": 24,
        "temperature": 0.7,
        "seed": 9,
        "presence_penalty": 1.2,
        "frequency_penalty": 0.6,
        "extra_body": {"repetition_penalty": 1.3, "ignore_eos": True},
    },
    "top-k-min-p": {
        "max_tokens": 16,
        "temperature": 1.2,
        "seed": 21,
        "extra_body": {"top_k": 8, "min_p": 0.02, "ignore_eos": True, "return_token_ids": True},
    },
    "bias-min-tokens": {
        "max_tokens": 16,
        "temperature": 0,
        "logit_bias": {"101": 4.0, str(EOS): 100.0},  # EOS at once, were it not for min_tokens
        "extra_body": {"min_tokens": 5, "stop_token_ids": [102], "return_token_ids": True},
    },
}


@pytest.mark.parametrize("mode", ["p2p", "centralized"])
@pytest.mark.parametrize("case", list(CASES))
def test_disaggregated_equals_colocated_with_every_option(
    case: str, mode: str, colocated: Any, request: pytest.FixtureRequest
) -> None:
    body = CASES[case]
    # A prompt of each mode's own, told apart from its first token: the colocated worker then has
    # it in its prefix cache exactly when the disaggregated one does. A cached prefix is not
    # recomputed, and attention over a prompt in two parts sums in another order: a logprob can
    # move by an ulp (measured: the same request twice to one worker).
    body = {
        **body,
        "prompt": f"{mode}: {PROMPT}",
        "extra_body": {"return_token_ids": True, **body.get("extra_body", {})},
    }
    want = _completion(colocated, **body).model_dump()
    got = _completion(request.getfixturevalue(mode), **body).model_dump()
    for key in ("text", "finish_reason", "token_ids", "logprobs"):
        assert got["choices"][0][key] == want["choices"][0][key], key
    if "logprobs" in body:
        lp = got["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(got["choices"][0]["token_ids"]) >= 1
        assert all(v <= 0 for v in lp["token_logprobs"])
        # Keyed by text: bytes that are pieces of a UTF-8 sequence all read U+FFFD and share a key.
        assert all(1 <= len(top) <= body["logprobs"] + 1 for top in lp["top_logprobs"])
        assert all(t in top for t, top in zip(lp["tokens"], lp["top_logprobs"], strict=True))
        offsets = lp["text_offset"]
        assert offsets == sorted(offsets) and offsets[0] == 0
    if case == "bias-min-tokens":
        ids = got["choices"][0]["token_ids"]
        assert len(ids) == 6 and ids[-1] == EOS  # 5 tokens first (min_tokens), then the bias wins


def test_the_options_change_the_output(p2p: Any) -> None:
    plain = _completion(p2p, max_tokens=24, temperature=0.7, seed=9, extra_body={"ignore_eos": True})
    penalized = _completion(p2p, **CASES["penalties"])
    assert plain.choices[0].text != penalized.choices[0].text
    forced = _completion(p2p, max_tokens=4, temperature=0, logit_bias={"120": 100.0})
    assert forced.choices[0].text == "xxxx"


def test_top_k_of_one_is_greedy(p2p: Any) -> None:
    body = {"max_tokens": 12, "extra_body": {"ignore_eos": True}}
    greedy = _completion(p2p, temperature=0, **body).choices[0].text
    assert (
        _completion(
            p2p,
            temperature=1.5,
            seed=3,
            top_p=0.9,
            **{**body, "extra_body": {"ignore_eos": True, "top_k": 1}},
        )
        .choices[0]
        .text
        == greedy
    )
    assert (
        _completion(p2p, temperature=1.5, seed=3, **body).choices[0].text != greedy
    )  # (or the check is void)


def test_echo_with_logprobs_scores_the_prompt(p2p: Any, colocated: Any) -> None:
    """What log-likelihood evaluations send: the prompt's own logprobs, one token of output."""
    body = {"max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}
    got = _completion(p2p, **body).choices[0]
    assert got.text.startswith(PROMPT)
    lp = got.logprobs
    prompt_tokens = len(PROMPT) + 1  # BOS + one byte each
    assert len(lp.tokens) == prompt_tokens + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens[1:prompt_tokens]) == PROMPT
    assert _completion(colocated, **body).choices[0].logprobs == lp


def test_streamed_logprobs_are_the_same_as_whole(p2p: Any) -> None:
    body = {"max_tokens": 10, "temperature": 0.8, "seed": 3, "logprobs": 2}
    whole = _completion(p2p, **body).choices[0].logprobs
    tokens, values = [], []
    for chunk in _completion(p2p, stream=True, **body):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                values += choice.logprobs.token_logprobs
    assert tokens == whole.tokens and values == whole.token_logprobs


def test_chat_logprobs(p2p: Any, colocated: Any) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi there"}],
        "max_tokens": 8,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
    }
    got = _client(p2p).chat.completions.create(**body).choices[0]
    assert got.logprobs is not None and len(got.logprobs.content) >= 1
    first = got.logprobs.content[0]
    assert first.logprob <= 0 and len(first.top_logprobs) == 3
    assert first.top_logprobs[0].logprob >= first.top_logprobs[1].logprob
    assert first.bytes == list(first.token.encode())
    want = _client(colocated).chat.completions.create(**body).choices[0].logprobs
    assert want is not None
    # The same tokens, and the same values up to the last bits: numpy's matrix products round
    # differently when a step's batch or a prompt's cached prefix differs, which the two
    # deployments do not control.
    assert [(t.token, [x.token for x in t.top_logprobs]) for t in want.content] == [
        (t.token, [x.token for x in t.top_logprobs]) for t in got.logprobs.content
    ]
    assert [t.logprob for t in want.content] == pytest.approx(
        [t.logprob for t in got.logprobs.content], abs=1e-9
    )


def test_max_tokens_beyond_the_context_is_refused_and_chat_defaults_to_the_rest(p2p: Any) -> None:
    with pytest.raises(openai.BadRequestError, match="context"):
        _completion(p2p, prompt=[7] * 2000, max_tokens=500)
    # No max_tokens: chat goes on past 16 tokens, here until the stop string (a forced token).
    reply = _client(p2p).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "go"}],
        temperature=0,
        logit_bias={"120": 100.0},
        stop=["x" * 30],
    )
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens >= 30


def _handoffs(cluster: Any, mode: str) -> float:
    async def read() -> float:
        async with aiohttp.ClientSession() as s:
            return await metric(s, cluster.url, "pdorch_kv_handoffs_total", mode=mode, outcome="ok")

    return asyncio.run(read())


# Long enough that the prompt has full KV blocks for the other choices to share.
LONG_PROMPT = PROMPT + ", there lived a fox who counted the stars every night and never slept."


@pytest.mark.parametrize("mode", ["p2p", "centralized"])
def test_n_choices_prefill_once_and_each_equals_a_single_seeded_request(
    mode: str, colocated: Any, request: pytest.FixtureRequest
) -> None:
    cluster = request.getfixturevalue(mode)
    body = {"prompt": LONG_PROMPT, "max_tokens": 10, "temperature": 0.9, "extra_body": {"ignore_eos": True}}
    before = _handoffs(cluster, mode)
    got = _completion(cluster, n=3, seed=11, **body)
    # One prompt, one KV handoff: the other two choices decode next to the first one's KV.
    assert _handoffs(cluster, mode) == before + 1
    assert [c.index for c in got.choices] == [0, 1, 2]
    for i, choice in enumerate(got.choices):
        alone = _completion(colocated, seed=11 + i, **body).choices[0]
        assert (choice.text, choice.finish_reason) == (alone.text, alone.finish_reason), i
    assert len({c.text for c in got.choices}) == 3  # seeds differ, so do the answers
    assert got.usage is not None
    assert got.usage.completion_tokens == 30
    assert got.usage.prompt_tokens == _completion(colocated, **body).usage.prompt_tokens  # counted once


def test_n_choices_stream_each_with_its_own_index_role_and_finish(p2p: Any) -> None:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": LONG_PROMPT}],
        "max_tokens": 8,
        "temperature": 0.8,
        "seed": 3,
        "n": 2,
        "logprobs": True,
        "top_logprobs": 2,
        "extra_body": {"ignore_eos": True},
    }
    client = _client(p2p)
    whole = client.chat.completions.create(**body)
    text = {0: "", 1: ""}
    roles, finishes, logprobs = [], [], {0: 0, 1: 0}
    for chunk in client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.index)
            text[c.index] += c.delta.content or ""
            if c.logprobs and c.logprobs.content:
                logprobs[c.index] += len(c.logprobs.content)
            if c.finish_reason:
                finishes.append(c.index)
    assert sorted(roles) == [0, 1] and sorted(finishes) == [0, 1]
    assert [text[0], text[1]] == [c.message.content for c in whole.choices]
    assert logprobs == {0: 8, 1: 8}
    assert usage.completion_tokens == whole.usage.completion_tokens == 16  # type: ignore[union-attr]


def test_n_choices_echo_the_prompt_and_its_logprobs_in_each(p2p: Any) -> None:
    body = {
        "max_tokens": 4,
        "temperature": 1.0,
        "echo": True,
        "logprobs": 1,
        "extra_body": {"ignore_eos": True},
    }
    got = _completion(p2p, n=2, seed=5, **body)
    for choice in got.choices:
        assert choice.text.startswith(PROMPT)
        lp = choice.logprobs
        assert lp is not None and lp.token_logprobs is not None
        assert lp.token_logprobs[0] is None  # the prompt's first token has none
        assert all(v is not None for v in lp.token_logprobs[1:])
    prompt_part = [c.logprobs.token_logprobs[:-4] for c in got.choices]  # type: ignore[union-attr]
    assert prompt_part[0] == prompt_part[1]


BATCH = [PROMPT, LONG_PROMPT, [1, 72, 105, 33]]  # text, and token ids, in one request


def test_a_batch_of_prompts_answers_each_as_a_request_of_its_own(p2p: Any, colocated: Any) -> None:
    """A list of prompts (what evaluation harnesses send at batch sizes above one): choice
    ``p * n + i`` is prompt p's choice i, each equal to that prompt asked alone."""
    body = {"max_tokens": 6, "temperature": 0.9, "seed": 11, "extra_body": {"ignore_eos": True}}
    got = _completion(p2p, prompt=BATCH, n=2, **body)
    assert [c.index for c in got.choices] == list(range(6))
    prompt_tokens = 0
    for p, prompt in enumerate(BATCH):
        alone = _completion(colocated, prompt=prompt, n=2, **body)
        assert [c.text for c in got.choices[2 * p : 2 * p + 2]] == [c.text for c in alone.choices], p
        prompt_tokens += alone.usage.prompt_tokens
    assert len({c.text for c in got.choices}) == 6
    assert got.usage.prompt_tokens == prompt_tokens
    assert got.usage.completion_tokens == 36


def test_a_batch_scored_with_echo_gives_each_prompt_its_own_logprobs(p2p: Any, colocated: Any) -> None:
    body = {"max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}
    got = _completion(p2p, prompt=BATCH[:2], **body)
    for choice, prompt in zip(got.choices, BATCH[:2], strict=True):
        assert choice.text.startswith(str(prompt))
        assert choice.logprobs == _completion(colocated, prompt=prompt, **body).choices[0].logprobs


def test_a_streamed_batch_numbers_its_choices_as_the_whole_answer_does(p2p: Any) -> None:
    body = {"prompt": BATCH, "max_tokens": 5, "temperature": 0, "extra_body": {"ignore_eos": True}}
    whole = _completion(p2p, **body)
    text, finishes, usage = {i: "" for i in range(3)}, [], None
    for chunk in _completion(p2p, stream=True, stream_options={"include_usage": True}, **body):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text[c.index] += c.text
            if c.finish_reason:
                finishes.append(c.index)
    assert [text[i] for i in range(3)] == [c.text for c in whole.choices]
    assert sorted(finishes) == [0, 1, 2]
    assert usage is not None and usage.completion_tokens == 15
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_a_batch_with_one_bad_prompt_is_refused_whole(p2p: Any) -> None:
    before = _prompt_tokens(p2p)
    with pytest.raises(openai.BadRequestError, match="outside the model's vocabulary"):
        _completion(p2p, prompt=[PROMPT, [1, 10**6]], max_tokens=3)
    with pytest.raises(openai.BadRequestError, match="at most 128 per request"):
        _completion(p2p, prompt=[PROMPT] * 65, n=2, max_tokens=3)
    assert _prompt_tokens(p2p) == before  # nothing was started for the good ones
    _completion(p2p, prompt=BATCH[:2], max_tokens=1)
    assert _prompt_tokens(p2p) > before  # (what the check above would have seen)


def _prompt_tokens(cluster: Any) -> float:
    async def read() -> float:
        async with aiohttp.ClientSession() as s:
            return await metric(s, cluster.url, "pdorch_prompt_tokens_total")

    return asyncio.run(read())
