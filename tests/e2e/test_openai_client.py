"""The official `openai` client against a real disaggregated cluster."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request

import openai
import pytest

from tests.e2e.helpers import MODEL

pytestmark = pytest.mark.e2e


@pytest.fixture
def client(p2p) -> openai.OpenAI:
    return openai.OpenAI(base_url=p2p.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage is not None and r.usage.prompt_tokens == 6  # BOS + 5 bytes
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_completion_matches_non_streaming(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt="stream me", max_tokens=20, temperature=0, seed=1)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="stream me",
            max_tokens=20,
            temperature=0,
            seed=1,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_chat(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_errors_surface_as_openai_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=-1)


def test_model_retrieve_and_json_errors_for_unknown_things(client: openai.OpenAI, p2p) -> None:
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405)):
        request = urllib.request.Request(p2p.url + path, method=method)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        assert e.value.code == status
        assert e.value.headers["Content-Type"].startswith("application/json")
        assert json.load(e.value)["error"]["code"] in ("not_found", "method_not_allowed")


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.load(r)


def test_tokenize_and_detokenize(p2p) -> None:
    got = _post(p2p.url + "/tokenize", {"model": MODEL, "prompt": "Hello"})
    assert got["tokens"] == [256, 72, 101, 108, 108, 111] and got["count"] == 6 and got["max_model_len"] > 0
    chat = _post(p2p.url + "/tokenize", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})
    assert chat["count"] > 2
    assert _post(p2p.url + "/detokenize", {"model": MODEL, "tokens": got["tokens"][1:]}) == {
        "prompt": "Hello"
    }


def _outcomes(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    found = re.findall(r'pdorch_requests_total\{outcome="([^"]+)"\} ([0-9.]+)', text)
    return {outcome: float(n) for outcome, n in found}


def test_every_request_is_counted_by_outcome_a_hang_up_as_client_gone(p2p) -> None:
    before = _outcomes(p2p.url)
    with pytest.raises(urllib.error.HTTPError):
        _post(p2p.url + "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0})
    with pytest.raises(urllib.error.HTTPError):
        _post(p2p.url + "/v1/completions", {"model": "nope", "prompt": "x"})
    body = {"model": MODEL, "prompt": "hang up", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    request = urllib.request.Request(
        p2p.url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        r.readline()  # the first event: the request is under way; then the client goes
    deadline = time.monotonic() + 20
    while _outcomes(p2p.url).get("client_gone", 0) <= before.get("client_gone", 0):
        assert time.monotonic() < deadline, "a hang-up was not counted"
        time.sleep(0.1)
    after = _outcomes(p2p.url)
    assert after.get("invalid_request", 0) == before.get("invalid_request", 0) + 1
    assert after.get("model_not_found", 0) == before.get("model_not_found", 0) + 1
    assert "Error handling request" not in (p2p.log_dir / "scheduler.log").read_text()
