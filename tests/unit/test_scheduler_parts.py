"""Table-driven tests of the scheduler's pure parts: config, stop strings, request validation,
the worker registry and pool signals."""

from __future__ import annotations

import threading
import time

import msgspec
import pytest
from aiohttp.test_utils import make_mocked_request

from scheduler.admission.gate import AdmissionGate
from scheduler.cluster import Cluster
from scheduler.config import SchedulerConfig, load_config
from scheduler.flow import Orchestrator
from scheduler.flow.attempt import Attempt, Failure
from scheduler.flow.orchestrator import _Run
from scheduler.flow.request import GenerationRequest
from scheduler.http.openai import _objectives, _token_ids
from scheduler.http.openai_schema import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    check_common,
    completion_prompts,
    parse_body,
)
from scheduler.inbox import Inbox
from scheduler.ledger.ledger import BookingFacts
from scheduler.metrics import Metrics
from scheduler.placement.framework import Placer
from scheduler.placement.types import Placement
from scheduler.planner import Planner
from scheduler.prediction.latency import LatencyLearner
from scheduler.prediction.output_length import OutputLengthPredictor
from scheduler.slo_window import SloConfig, SloWindow
from scheduler.stop_strings import TextStream
from scheduler.tokenizer.base import GIL_FREE_CHARS
from scheduler.tokenizer.byte_level import ByteTokenizer
from transport.errors import ErrorCode, PdorchError
from transport.messages import Hello, KvMode, Role, SamplingParams
from transport.security import SecurityConfig

# ------------------------------------------------------------------------------------- config

# Tests of the flow, not of authentication.
OPEN = SecurityConfig(insecure=True)


def test_config_layers_file_env_and_overrides(tmp_path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("port: 9001\nkv_mode: centralized\nkv_broker: tcp://127.0.0.1:5700\nqueue_timeout_s: 3\n")
    cfg = load_config(
        f,
        env={"PDORCH_QUEUE_TIMEOUT_S": "7", "OTHER": "x", **INSECURE_ENV},
        overrides={"port": 9002, "host": None},
    )
    assert (cfg.port, cfg.kv_mode, cfg.queue_timeout_s, cfg.host) == (9002, "centralized", 7, "127.0.0.1")


INSECURE_ENV = {"PDORCH_INSECURE": "1"}


def test_a_section_from_the_environment_adds_to_the_files(tmp_path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("lora: {admin_keys: [k], timeout_s: 5}\n")
    cfg = load_config(f, env={"PDORCH_LORA": "{runtime_updates: true, timeout_s: 9}", **INSECURE_ENV})
    assert (cfg.lora.runtime_updates, cfg.lora.admin_keys, cfg.lora.timeout_s) == (True, ["k"], 9)


def test_an_empty_key_is_refused() -> None:
    """An empty key (an empty Secret value, say) would let requests without a key through."""
    for env in ({"PDORCH_API_KEYS": "[a, '']"}, {"PDORCH_LORA": "{admin_keys: [' ']}"}):
        with pytest.raises(PdorchError, match="must not hold an empty key"):
            load_config(env={**env, **INSECURE_ENV})


def test_string_settings_from_the_environment_are_taken_as_written() -> None:
    """A value of digits (or 'yes', or 'null') must not become a number, a bool or nothing."""
    for value in ("0123456789", "yes", "null", "[a, b]"):
        assert load_config(env={"PDORCH_KV_BROKER": value, **INSECURE_ENV}).kv_broker == value
        keys = {"PDORCH_KEY_FILE": value, "PDORCH_TRUSTED_KEYS": value}
        assert load_config(env=keys).security.key_file == value
    assert load_config(env={"PDORCH_PORT": "9000", **INSECURE_ENV}).port == 9000  # others still parse


def test_security_comes_from_the_file_then_the_environment(tmp_path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("security: {key_file: /k/s.key, trusted_keys: /t, kv_payload: plaintext}\n")
    cfg = load_config(f, env={"PDORCH_TRUSTED_KEYS": "/elsewhere"})
    assert (cfg.security.key_file, cfg.security.trusted_keys) == ("/k/s.key", "/elsewhere")
    assert cfg.security.kv_payload == "plaintext"


@pytest.mark.parametrize(
    "yaml_text, needle",
    [
        ("port: 0\n", "'port'"),
        ("kv_mode: carrier-pigeon\n", "kv_mode"),
        ("no_such_key: 1\n", "no_such_key"),
        ("kv_mode: centralized\n", "kv_broker"),
        ("heartbeat_liveness: 1\n", "heartbeat_liveness"),
        ("- a list\n", "mapping"),
        ("port: [\n", "YAML"),
        ("queue_timeout_s: lots\n", "queue_timeout_s"),
        ("placement: {decode: {picker: {type: coin-flip}}}\n", "coin-flip"),
        ("admission: {default_weight: 0}\n", "weight"),
        ("slo: {window_s: 0}\n", "'slo.window_s'"),
        ("slo: {tpot_s: -1}\n", "'slo.tpot_s'"),
        ("slo: {ttft: 1}\n", "ttft"),
        # A pool's SLO guard without the target it is judged on would never act: refused.
        (
            "kubernetes: {decode: {lws_name: d, pod_labels: {a: b}, autoscaling: {min_slo_attainment: 1}}}",
            "'slo.tpot_s' must be > 0 when kubernetes.decode.autoscaling.min_slo_attainment is set",
        ),
        (
            "kubernetes: {prefill: {lws_name: p, pod_labels: {a: b}, autoscaling: {min_slo_attainment: 1}}}",
            "'slo.ttft_s'",
        ),
        ("http: {header_timeout_s: 0}\n", "'http.header_timeout_s'"),
        ("http: {idle_timeout_s: -1}\n", "'http.idle_timeout_s'"),
        ("http: {write_stall_timeout_s: 0}\n", "'http.write_stall_timeout_s'"),
        ("http: {max_json_depth: 2}\n", "'http.max_json_depth'"),
        ("http: {max_connections_per_client: -1}\n", "'http.max_connections_per_client'"),
        ("http: {keepalive: 1}\n", "keepalive"),
        ("security: {insecure: false}\n", "'security.key_file' is required"),
        ("security: {insecure: false, key_file: /a.key}\n", "'security.trusted_keys' is required"),
        ("security: {key_file: /a.key, trusted_keys: /t, kv_payload: rot13}\n", "kv_payload"),
        ("security: {insecure: true, key_file: /a.key}\n", "'security.insecure' cannot be set"),
    ],
)
def test_config_errors_name_the_bad_key(tmp_path, yaml_text: str, needle: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(yaml_text)
    env = {} if "security" in yaml_text else INSECURE_ENV
    with pytest.raises(PdorchError) as e:
        load_config(f, env=env)
    assert e.value.code is ErrorCode.CONFIG and needle in e.value.message


def test_without_keys_or_insecure_the_scheduler_refuses_to_start() -> None:
    """Running open is a written choice, never the default."""
    with pytest.raises(PdorchError) as e:
        load_config(env={})
    assert "'security.key_file' is required" in e.value.message and "pdorch keys generate" in e.value.message


# ------------------------------------------------------------------------------- stop strings


def _run(chunks: list[str], stop: list[str]) -> tuple[str, bool]:
    ts = TextStream(ByteTokenizer().decoder(), stop)
    out = ""
    for c in chunks:
        out += ts.feed(list(c.encode()))
        if ts.stopped:
            return out, True
    return out + ts.finish(), False


@pytest.mark.parametrize(
    "chunks, stop, expected",
    [
        (["hello world"], [], ("hello world", False)),
        (["hello ", "wor", "ld"], ["world"], ("hello ", True)),
        (["ab", "cSTO", "Px"], ["STOP"], ("abc", True)),
        (["STO", "NE"], ["STOP"], ("STONE", False)),  # a held-back partial match is released
        (["x\n", "\ny"], ["\n\n", "zz"], ("x", True)),
        (["é", "t", "é"], ["té"], ("é", True)),  # multi-byte UTF-8
    ],
)
def test_stop_strings(chunks: list[str], stop: list[str], expected: tuple[str, bool]) -> None:
    assert _run(chunks, stop) == expected


def test_incomplete_utf8_is_held_until_complete() -> None:
    ts = TextStream(ByteTokenizer().decoder(), [])
    data = "ü".encode()
    assert ts.feed([data[0]]) == ""
    assert ts.feed([data[1]]) == "ü"


# ------------------------------------------------------------------------ request validation


@pytest.mark.parametrize(
    "body, needle",
    [
        (b"", "empty"),
        (b"{not json", "not valid JSON"),
        (b'{"model": "m"}', "prompt"),
        (b'{"model": "m", "prompt": "x", "max_tokens": "ten"}', "max_tokens"),
        (b'{"model": 3, "prompt": "x"}', "model"),
        (b"[1, 2]", "object"),
        (b'{"model": null, "prompt": "x"}', "missing required field `model`"),  # null is "not given"
        (b'{"model": "m", "prompt": "x", "n": "two", "stop": null}', "`int`, got `str`"),
    ],
)
def test_malformed_bodies(body: bytes, needle: str) -> None:
    with pytest.raises(PdorchError) as e:
        parse_body(body, CompletionRequest)
    assert e.value.code is ErrorCode.INVALID_REQUEST and needle in e.value.message


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("hi", ["hi"]),
        ([1, 2, 3], [[1, 2, 3]]),
        (["hi"], ["hi"]),
        ([[5, 6]], [[5, 6]]),
        (["a", "b"], ["a", "b"]),  # a batch
        ([[1], [2, 3]], [[1], [2, 3]]),
        (["a", [7]], ["a", [7]]),
        (["x"] * 128, ["x"] * 128),
    ],
)
def test_prompt_forms(prompt: object, expected: object) -> None:
    req = CompletionRequest(model="m", prompt=prompt)  # type: ignore[arg-type]
    assert completion_prompts(req) == expected


@pytest.mark.parametrize(
    "prompt, n, needle",
    [
        ("", 1, "empty"),
        ([], 1, "empty"),
        ([[]], 1, "empty"),
        (["a", ""], 1, "empty"),
        ([[1], []], 1, "empty"),
        ([1, "x"], 1, "a list of either"),
        ([True], 1, "a list of either"),
        ([[1, True]], 1, "a list of either"),
        ([{"a": 1}], 1, "a list of either"),
        (["x"] * 129, 1, "129 choices; at most 128"),
        (["x", "y"], 65, "130 choices; at most 128"),
    ],
)
def test_bad_prompts(prompt: object, n: int, needle: str) -> None:
    with pytest.raises(PdorchError) as e:
        completion_prompts(CompletionRequest(model="m", prompt=prompt, n=n))  # type: ignore[arg-type]
    assert e.value.code is ErrorCode.INVALID_REQUEST
    assert needle in str(e.value)


@pytest.mark.parametrize(
    "fields, max_tokens, needle",
    [
        ({}, 0, "at least 1"),
        ({}, -5, "at least 1"),
        ({}, 10**9, "at most"),
        ({"n": 0}, 5, "'n' must be between 1 and 128"),
        ({"n": 129}, 5, "'n' must be between 1 and 128"),
        ({"n": 2, "best_of": 3}, 5, "best_of"),
        ({"temperature": 3.0}, 5, "temperature"),
        ({"top_p": 0.0}, 5, "top_p"),
        ({"logprobs": 21}, 5, "logprobs"),
        ({"logprobs": -1}, 5, "logprobs"),
        ({"prompt_logprobs": 30}, 5, "prompt_logprobs"),
        ({"presence_penalty": 2.5}, 5, "presence_penalty"),
        ({"frequency_penalty": -3.0}, 5, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, 5, "repetition_penalty"),
        ({"logit_bias": {"hello": 1.0}}, 5, "logit_bias"),
        ({"logit_bias": {"5": -101.0}}, 5, "logit_bias"),
        ({"min_tokens": 6}, 5, "min_tokens"),
        ({"min_tokens": -1}, 5, "min_tokens"),
        ({"suffix": "tail"}, 5, "suffix"),
    ],
)
def test_bad_sampling(fields: dict, max_tokens: int, needle: str) -> None:
    req = CompletionRequest(model="m", prompt="x", **fields)
    with pytest.raises(PdorchError) as e:
        check_common(req, max_tokens, default_max=16, limit=4096)
    assert needle in e.value.message


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"top_logprobs": 2}, "needs 'logprobs'"),
        ({"logprobs": True, "top_logprobs": 21}, "'top_logprobs' must be between 0 and 20"),
    ],
)
def test_chat_fields_we_cannot_honour_are_refused(fields: dict, needle: str) -> None:
    req = ChatCompletionRequest(model="m", messages=[ChatMessage("user", "hi")], **fields)
    with pytest.raises(PdorchError) as e:
        check_common(req, 5, default_max=16, limit=4096)
    assert needle in e.value.message


@pytest.mark.parametrize(
    "fields",
    [
        {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "echo": False, "suffix": ""},
        {"presence_penalty": None, "logit_bias": None, "suffix": None},
        # What used to be refused, now honoured: the values are valid.
        {"logprobs": 5, "echo": True, "presence_penalty": 1.5, "frequency_penalty": -2.0},
        {"logit_bias": {"42": 100, "7": -100}, "min_tokens": 5, "repetition_penalty": 1.2},
    ],
)
def test_neutral_values_of_unsupported_fields_are_accepted(fields: dict) -> None:
    """Many clients send these with their defaults on every request."""
    req = CompletionRequest(model="m", prompt="x", **fields)
    assert check_common(req, 5, default_max=16, limit=4096) == 5


def test_neutral_chat_fields_are_accepted() -> None:
    req = ChatCompletionRequest(
        model="m", messages=[ChatMessage("user", "hi")], tools=[], response_format={"type": "text"}
    )
    assert check_common(req, 5, default_max=16, limit=4096) == 5


@pytest.mark.parametrize(
    "field, changes, neutral",
    [
        ("use_beam_search", True, False),
        ("include_stop_str_in_output", True, False),
        ("skip_special_tokens", False, True),
        ("allowed_token_ids", [1, 2], []),
        ("guided_json", {"type": "object"}, None),
        ("truncate_prompt_tokens", 100, None),
    ],
)
def test_vllm_extensions_that_would_change_the_output_are_refused(
    field: str, changes: object, neutral: object
) -> None:
    """Not silently ignored: the client would get another output than the one it asked for."""
    body = {"model": "m", "prompt": "x"}
    refused = parse_body(msgspec.json.encode({**body, field: changes}), CompletionRequest)
    with pytest.raises(PdorchError, match=f"'{field}' is not supported"):
        check_common(refused, 5, default_max=16, limit=4096)
    accepted = parse_body(msgspec.json.encode({**body, field: neutral}), CompletionRequest)
    assert check_common(accepted, 5, default_max=16, limit=4096) == 5


def test_null_means_not_given_as_in_openais_api() -> None:
    """Clients send null for options they leave unset; each takes its default, at any depth."""
    req = parse_body(
        b'{"model": "m", "prompt": "x", "stream": null, "n": null, "echo": null, "max_tokens": null,'
        b' "temperature": 1, "stream_options": {"include_usage": null}, "logit_bias": {"5": null}}',
        CompletionRequest,
    )
    assert (req.stream, req.n, req.echo, req.max_tokens, req.temperature) == (False, 1, False, None, 1.0)
    assert req.stream_options is not None and not req.stream_options.include_usage
    assert req.logit_bias == {}
    chat = parse_body(
        b'{"model": "m", "messages": [{"role": "assistant", "content": null}, {"role": "user",'
        b' "content": "hi", "name": null}], "logprobs": null, "ignore_eos": null}',
        ChatCompletionRequest,
    )
    assert [m.content for m in chat.messages] == [None, "hi"] and not chat.ignore_eos


def test_a_body_after_a_utf8_byte_order_mark_is_read() -> None:
    """JSON must not carry one, but a reader may skip it (RFC 8259, 8.1); some clients send it."""
    req = parse_body(b'\xef\xbb\xbf{"model": "m", "prompt": "hi"}', CompletionRequest)
    assert (req.model, req.prompt) == ("m", "hi")
    with pytest.raises(PdorchError, match="empty"):
        parse_body(b"\xef\xbb\xbf  ", CompletionRequest)


def test_chat_body_parses() -> None:
    req = parse_body(
        b'{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"extra":1}',
        ChatCompletionRequest,
    )
    assert req.messages[0].content[0].text == "hi"  # type: ignore[index,union-attr]


# ------------------------------------------------------------------------------------ cluster


def _hello(wid: str, role: Role) -> Hello:
    return Hello(1, wid, role, "reference", "m", 4096, 16, 100, kv_endpoint="tcp://127.0.0.1:1")


def _book(c: Cluster, job: str, prefill: str, decode: str, reserve: int, prompt: int = 10) -> None:
    facts = BookingFacts(prompt, (), 0, decode_steps=0, tpot_slo_s=0.0)
    c.ledger.book(job, Placement(prefill, decode, reserve), facts, cached=0, now=0.0)


def test_cluster_expiry_and_drop_report_lost_requests() -> None:
    lost: list[tuple[str, list[str], str]] = []
    c = Cluster(
        heartbeat_interval_s=1.0, heartbeat_liveness=3, on_lost=lambda w, r, why: lost.append((w, r, why))
    )
    c.register(b"p", _hello("p", Role.PREFILL), now=0.0)
    c.register(b"d", _hello("d", Role.DECODE), now=0.0)
    _book(c, "req-1", "p", "d", reserve=5)
    assert c.get("d").reserved_blocks == 5  # type: ignore[union-attr]
    c.get("p").liveness.seen(2.5)  # type: ignore[union-attr]
    assert c.expire(now=3.5) == ["d"]
    assert lost == [("d", ["req-1"], "heartbeat expired")]
    assert c.get("p").requests.keys() == {"req-1"}  # type: ignore[union-attr]
    assert [w.worker_id for w in c.workers()] == ["p"]


def test_cluster_release_unreserves_and_reregister_drops_old_requests() -> None:
    lost: list[str] = []
    c = Cluster(heartbeat_interval_s=1.0, heartbeat_liveness=3, on_lost=lambda w, r, why: lost.extend(r))
    c.register(b"d", _hello("d", Role.DECODE), now=0.0)
    _book(c, "a", "d", "d", 4)
    _book(c, "b", "d", "d", 2)
    c.ledger.release("a", now=0.0)
    assert c.get("d").reserved_blocks == 2  # type: ignore[union-attr]
    c.register(b"d", _hello("d", Role.DECODE), now=1.0)
    assert lost == ["b"] and c.get("d").reserved_blocks == 0  # type: ignore[union-attr]


# ------------------------------------------------------------------------------- pool signals


def test_pool_signals_count_serving_workers_and_reserved_demand() -> None:
    from scheduler.pool_signals import pool_signals

    c = Cluster(heartbeat_interval_s=1.0, heartbeat_liveness=3, on_lost=lambda *a: None)
    for wid, role in (("p0", Role.PREFILL), ("d0", Role.DECODE), ("d1", Role.DECODE)):
        c.register(wid.encode(), _hello(wid, role), now=0.0)
    _book(c, "r1", "p0", "d0", 50, prompt=300)  # capacity 100 -> half full; 300 tokens to prefill
    c.set_draining("d1", True)
    lim = AdmissionGate()
    slo = SloWindow(SloConfig(ttft_s=1.0, tpot_s=0.1, min_requests=2))
    decode = pool_signals(c, lim, slo, "decode")
    assert (decode.replicas, decode.inflight_requests, decode.kv_occupancy) == (1, 1, 0.5)
    assert decode.predicted_tokens == 50 * 16
    assert decode.slo_attainment is None  # nothing finished yet
    prefill = pool_signals(c, lim, slo, "prefill")
    assert (prefill.replicas, prefill.predicted_tokens, prefill.inflight_requests) == (1, 300, 1)
    # Each pool reads its own phase: prefill the first token, decode the tokens after it.
    slo.record(0.5, 0.5)
    slo.record(0.5, 0.05)
    assert pool_signals(c, lim, slo, "prefill").slo_attainment == 1.0
    assert pool_signals(c, lim, slo, "decode").slo_attainment == 0.5


# ------------------------------------------------------------------------------- SLO headers


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, (0.0, 0.0)),
        ({"X-SLO-TTFT-Ms": "1500"}, (1.5, 0.0)),
        ({"x-slo-ttft-ms": "250.5", "X-SLO-TPOT-Ms": "40"}, (0.2505, 0.04)),
    ],
)
def test_a_request_brings_its_own_objectives(headers: dict[str, str], expected: tuple[float, float]) -> None:
    greq = GenerationRequest("r", "m", [1, 2], SamplingParams(max_tokens=4))
    _objectives(make_mocked_request("POST", "/v1/completions", headers=headers), greq)
    assert (greq.ttft_slo_s, greq.tpot_slo_s) == pytest.approx(expected)


@pytest.mark.parametrize("value", ["soon", "-5", "0", "inf"])
def test_bad_objective_headers_are_refused(value: str) -> None:
    greq = GenerationRequest("r", "m", [1], SamplingParams(max_tokens=4))
    with pytest.raises(PdorchError) as info:
        _objectives(make_mocked_request("POST", "/", headers={"X-SLO-TPOT-Ms": value}), greq)
    assert info.value.code is ErrorCode.INVALID_REQUEST and "X-SLO-TPOT-Ms" in info.value.message


def _flow(cfg: SchedulerConfig, cluster: Cluster) -> tuple[Orchestrator, Planner]:
    """The live planner and orchestrator over ``cluster`` (no control plane: nothing is sent)."""
    placer = Placer(cfg.placement)
    latency = LatencyLearner(placer.config.accelerators)
    planner = Planner(cluster, cluster.ledger, placer, OutputLengthPredictor(), latency, colocated=False)
    flow = Orchestrator(cfg, cluster, None, Inbox(), planner, Metrics(cfg.slo))  # type: ignore[arg-type]
    return flow, planner


def test_objectives_come_from_the_request_else_from_config_and_a_moved_request_is_best_effort() -> None:
    cluster = Cluster(heartbeat_interval_s=1.0, heartbeat_liveness=3, on_lost=lambda *a: None)
    flow, _ = _flow(SchedulerConfig(slo=SloConfig(ttft_s=2.0, tpot_s=0.05), security=OPEN), cluster)
    greq = GenerationRequest("r", "m", list(range(40)), SamplingParams(max_tokens=8))
    _, preq = flow.plan(greq)
    assert (preq.ttft_slo_s, preq.tpot_slo_s, preq.best_effort) == (2.0, 0.05, False)
    assert preq.prompt_len == 40 and len(preq.block_hashes) == 2  # 16-token prefix blocks
    greq.ttft_slo_s = 0.5
    assert flow.plan(greq)[1].ttft_slo_s == 0.5
    _, moved = flow._plan(greq, "r.1", list(range(45)), 3, resumed=True)
    assert (moved.request_id, moved.ttft_slo_s, moved.tpot_slo_s, moved.best_effort) == (
        "r.1",
        0.0,
        0.05,
        True,
    )


def _four_node_flow() -> tuple[Orchestrator, Cluster]:
    cluster = Cluster(heartbeat_interval_s=1.0, heartbeat_liveness=3, on_lost=lambda *a: None)
    for wid in ("p0", "p1", "d0", "d1"):
        cluster.register(wid.encode(), _hello(wid, Role.PREFILL if wid[0] == "p" else Role.DECODE), now=0.0)
    flow, _ = _flow(SchedulerConfig(security=OPEN), cluster)
    return flow, cluster


def _in_handoff(flow: Orchestrator, job: str, prefill: str, decode: str, mode: KvMode) -> Attempt:
    """An attempt of request ``job`` whose KV is on its way from ``prefill`` to ``decode``."""
    a = Attempt(0, job, prefill, decode, 0, time.monotonic() - 1.0, mode, first_token_in=True)
    flow._inbox.open(job)
    for wid in (prefill, decode):
        flow._inbox.expect(job, job, wid)
    flow._unlanded[job] = a
    return a


def _told(flow: Orchestrator, job: str) -> list[tuple[str, ...]]:
    """The KV paths the request of ``job`` was told back off."""
    queue = flow._inbox._queues[job]
    return [event.path for _, _, event in (queue.get_nowait() for _ in range(queue.qsize()))]


def test_handoffs_over_a_kv_path_that_backs_off_are_told_and_no_others() -> None:
    flow, _ = _four_node_flow()
    failed = _in_handoff(flow, "r1", "p0", "d0", KvMode.P2P)
    _in_handoff(flow, "r2", "p0", "d0", KvMode.P2P)  # the same pair
    _in_handoff(flow, "r3", "p1", "d0", KvMode.P2P)  # another sender to the same receiver
    _in_handoff(flow, "r4", "p0", "d0", KvMode.CENTRALIZED)  # through the broker, not the pair
    _in_handoff(flow, "r5", "p0", "d1", KvMode.P2P)
    _in_handoff(flow, "r6", "p1", "d1", KvMode.P2P)
    flow._back_off_kv_path(failed, Failure("", ErrorCode.KV_TIMEOUT, "no KV", "stalled"))
    assert [_told(flow, job) for job in ("r1", "r2", "r3", "r4", "r5", "r6")] == [
        [],
        [("p0", "d0")],
        [],
        [],
        [],
        [],
    ]
    # p0's handoffs to a second receiver fail too: its own KV network is taken as down, and every
    # handoff from it hears so (r5 of its pair first), none of p1's.
    flow._back_off_kv_path(flow._unlanded["r5"], Failure("p0", ErrorCode.KV_TIMEOUT, "no KV", "error"))
    assert [_told(flow, job) for job in ("r2", "r3", "r4", "r5", "r6")] == [
        [("p0",)],
        [],
        [],
        [],
        [],
    ]


def test_a_request_moves_off_a_kv_path_that_backs_off_only_if_it_has_another_way() -> None:
    """With another way (here the decode node prefilling itself, or the prefill node running it
    whole) the request moves on; with none, placement would probe the same pair again, so the
    handoff under way is left to land or time out."""
    slo_split_only = {"type": "slo", "params": {"colocate": False}}
    split_only = {"fallback_to_prefill_node": False, "handler": slo_split_only}
    for config, another_way in (({}, True), (split_only, False)):
        cluster = Cluster(heartbeat_interval_s=1.0, heartbeat_liveness=3, on_lost=lambda *a: None)
        for wid, role in (("p", Role.PREFILL), ("d", Role.DECODE)):
            cluster.register(wid.encode(), _hello(wid, role), now=0.0)
        cfg = msgspec.convert({"placement": config, "security": {"insecure": True}}, SchedulerConfig)
        flow, _ = _flow(cfg, cluster)
        greq = GenerationRequest("r", "m", list(range(40)), SamplingParams(max_tokens=8))
        run = _Run(greq, flow.plan(greq)[1])
        now = time.monotonic()
        cluster.ledger.kv_handoff_failed("p", "d", now, now - 1.0, 5.0, 60.0)
        assert cluster.ledger.kv_path_backs_off("p", "d", now)
        assert flow._another_way(run) is another_way


def test_a_following_choice_is_booked_colocated_where_the_prompt_is() -> None:
    """The other choices of an n > 1 request go where choice 0's KV is, booked in the one ledger like
    any placement (so later decisions see them), never onto a draining or unknown worker."""
    cluster = Cluster(heartbeat_interval_s=1.0, heartbeat_liveness=3, on_lost=lambda *a: None)
    for wid, role in (("p", Role.PREFILL), ("d", Role.DECODE)):
        cluster.register(wid.encode(), _hello(wid, role), now=0.0)
    flow, planner = _flow(SchedulerConfig(security=OPEN), cluster)
    greq = GenerationRequest("r-1", "m", list(range(40)), SamplingParams(max_tokens=8))
    _, preq = flow.plan(greq)
    placement = planner.follow(preq, "d", now=0.0)
    assert placement is not None and (placement.prefill, placement.decode) == ("d", "d")
    assert placement.reserve_blocks > 0
    # Not its prompt's full blocks: choice 0 holds them there, counted as used.
    node = cluster.get("d")
    assert node is not None
    shared = len(greq.prompt_token_ids) // node.hello.block_size
    assert shared > 0 and node.reserved_blocks == placement.reserve_blocks - shared
    planner.release("r-1", now=0.0)
    assert cluster.get("d").reserved_blocks == 0  # type: ignore[union-attr]
    assert planner.follow(preq, "gone", now=0.0) is None
    cluster.set_draining("d", True)
    assert planner.follow(preq, "d", now=0.0) is None


class _ThreadNoting(ByteTokenizer):
    """The byte tokenizer, noting which thread each text and chat was tokenized on."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def encode(self, text: str) -> list[int]:
        self.threads.append(threading.get_ident())
        return super().encode(text)


async def test_a_long_prompt_is_tokenized_off_the_event_loop() -> None:
    """A text or chat of ``GIL_FREE_CHARS`` characters or more goes to a thread (the loop serves
    others meanwhile); a shorter one is tokenized in place; both give the same ids."""
    tokenizer, loop_thread = _ThreadNoting(), threading.get_ident()
    short, long = "s" * (GIL_FREE_CHARS - 1), "l" * GIL_FREE_CHARS
    assert await _token_ids(tokenizer, short, 10**6) == ByteTokenizer().encode(short)
    assert await _token_ids(tokenizer, long, 10**6) == ByteTokenizer().encode(long)
    chat = [("user", long)]
    assert await _token_ids(tokenizer, chat, 10**6) == ByteTokenizer().apply_chat_template(chat)
    assert tokenizer.threads[0] == loop_thread
    assert loop_thread not in tokenizer.threads[1:] and len(tokenizer.threads) == 3


async def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing() -> None:
    tokenizer = _ThreadNoting()
    with pytest.raises(PdorchError) as e:
        await _token_ids(tokenizer, "x" * 101, 100)  # the byte tokenizer: a token per character at least
    assert e.value.code is ErrorCode.PROMPT_TOO_LONG and tokenizer.threads == []
