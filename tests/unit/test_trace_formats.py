"""Public trace formats beyond the three in the shared directory, each written here in miniature."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from scheduler.placement.policies import policy
from simulate.cluster import parse_cluster
from simulate.runner import simulate
from simulate.trace import load_trace
from transport.errors import PdorchError


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_azure_2024_timestamps_carry_an_offset(tmp_path: Path) -> None:
    f = tmp_path / "AzureLLMInferenceTrace_conv_1week.csv"
    f.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2024-05-10 00:00:00.009930+00:00,1000,20\n"
        "2024-05-10 02:00:01.5+02:00,2000,30\n"  # 00:00:01.5 UTC
        "2024-05-09T23:59:59Z,500,0\n"  # ISO 8601, the earliest
    )
    t = load_trace(f)
    assert t.name == "AzureLLMInferenceTrace_conv_1week"
    assert [r.prompt_len for r in t.requests] == [500, 1000, 2000]
    assert [r.arrival_s for r in t.requests] == pytest.approx([0.0, 1.00993, 2.5])
    assert t.requests[0].output_len == 1  # an empty answer replays as one token


def test_azure_2023_naive_timestamps_still_read(tmp_path: Path) -> None:
    f = tmp_path / "code.csv"
    f.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:04.0319600,3180,8\n"
        "2023-11-16 18:17:03.9799600,4808,10\n"
    )
    assert [r.arrival_s for r in load_trace(f).requests] == pytest.approx([0.0, 0.052])


def test_burstgpt_reads_its_columns_and_ignores_the_rest(tmp_path: Path) -> None:
    f = tmp_path / "BurstGPT_1.csv"
    f.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "45,GPT-4,1087,0,1087,Conversation log\n"
        "5,ChatGPT,472,18,490,Conversation log\n"
        "\n"
        "5.5,ChatGPT,30,12,42,API log\n"
    )
    t = load_trace(f)
    assert [(r.arrival_s, r.prompt_len, r.output_len) for r in t.requests] == [
        (0.0, 472, 18),
        (0.5, 30, 12),
        (40.0, 1087, 1),  # failed in production (no response): replayed as a one-token answer
    ]


def test_qwen_bailian_block_hashes_are_chained_into_prefixes(tmp_path: Path) -> None:
    rows = [
        {"chat_id": 1, "parent_chat_id": -1, "timestamp": 0.5, "input_length": 48, "output_length": 9,
         "type": "text", "turn": 1, "hash_ids": [5, 6, 7]},
        {"chat_id": 2, "parent_chat_id": 1, "timestamp": 3.25, "input_length": 64, "output_length": 4,
         "type": "text", "turn": 2, "hash_ids": [5, 6, 9, 10]},
        {"chat_id": 3, "parent_chat_id": -1, "timestamp": 1.0, "input_length": 32, "output_length": 2,
         "type": "search", "turn": 1, "hash_ids": [6, 7]},
    ]  # fmt: skip
    t = load_trace(_jsonl(tmp_path / "qwen_traceA_blksz_16.jsonl", rows))
    assert t.prefix_block_tokens == 16
    assert [r.arrival_s for r in t.requests] == [0.0, 0.5, 2.75]  # seconds, not Mooncake's ms
    a, c, b = (r.hash_ids for r in t.requests)
    assert a[:2] == b[:2] and a[2] != b[2]  # the same first two blocks, then different ones
    # The same block content after another prefix is not the same prefix.
    assert not set(c) & set(a)
    assert 0 not in a + b + c
    assert load_trace(_jsonl(tmp_path / "qwen_coder_blksz_32.jsonl", rows)).prefix_block_tokens == 32


def test_mooncake_ids_stay_as_they_are(tmp_path: Path) -> None:
    rows = [
        {"timestamp": 1500, "input_length": 600, "output_length": 9, "hash_ids": [0]},
        {"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [0, 1]},
    ]
    m = load_trace(_jsonl(tmp_path / "conversation_trace.jsonl", rows))
    assert m.prefix_block_tokens == 512
    assert [(r.arrival_s, r.hash_ids) for r in m.requests] == [(0.0, (1, 2)), (1.5, (1,))]


def test_gzip_compressed_traces_read_as_the_plain_ones(tmp_path: Path) -> None:
    text = (
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n0,x,10,2,12,y\n3,x,20,4,24,y\n"
    )
    plain = tmp_path / "burst.csv"
    plain.write_text(text)
    packed = tmp_path / "burst.csv.gz"
    packed.write_bytes(gzip.compress(text.encode()))
    assert load_trace(packed) == load_trace(plain)
    row = {"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [3]}
    jl = tmp_path / "m.jsonl.gz"
    jl.write_bytes(gzip.compress((json.dumps(row) + "\n").encode()))
    assert load_trace(jl).requests[0].hash_ids == (4,)


def test_limit_reads_only_the_first_rows(tmp_path: Path) -> None:
    f = tmp_path / "big.csv"
    f.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2024-05-10 00:00:00+00:00,10,1\n2024-05-10 00:00:01+00:00,20,2\n"
        "not a time,x,y\n"  # never read with a limit of two
    )
    assert len(load_trace(f, limit=2).requests) == 2
    with pytest.raises(PdorchError, match=r"big\.csv:4: TIMESTAMP is neither a number nor a date"):
        load_trace(f)


BURST = "Timestamp,Request tokens,Response tokens\n"
AZURE = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
RECORD = '{"timestamp": 0, "input_length": 5, "output_length": 1'


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.csv", "when,prompt,answer\n1,2,3\n", r"unknown CSV trace .* BurstGPT: Timestamp, Request tokens"),
        ("a.csv", BURST + "1,-5,3\n", r"a\.csv:2: Request tokens must be a whole number >= 0"),
        ("a.csv", BURST + "nan,5,3\n", r"a\.csv:2: Timestamp must be finite"),
        ("a.csv", BURST + "1,5\n", r"a\.csv:2: 2 fields where the header has 3"),
        ("a.csv", BURST + "1,2.5,3\n", r"whole number"),
        ("a.csv", AZURE + "2024-13-40 00:00:00,1,1\n", r"not a valid date"),
        ("a.csv", BURST, r"empty"),
        ("a.jsonl", RECORD + "}\n{oops\n", r"a\.jsonl:2: not JSON"),
        ("a.jsonl", "[1, 2]\n", r"a\.jsonl:1: a record must be a JSON object"),
        (
            "a.jsonl",
            '{"ts": 0, "input_length": 5}\n',
            r"a\.jsonl:1: unknown JSONL .* \(no timestamp, output_",
        ),
        ("a.jsonl", RECORD + ', "hash_ids": "ab"}\n', r"hash_ids must be a list"),
        ("a.jsonl", RECORD + ', "hash_ids": [-1]}\n', r"hash_ids must be >= 0"),
        ("a.jsonl", '{"timestamp": true, "input_length": 5, "output_length": 1}\n', r"timestamp is neither"),
        ("a.parquet", "x", r"unknown trace format '\.parquet'"),
        ("a.csv.gz", "not gzip", r"cannot read trace"),
    ],
)
def test_bad_traces_get_a_clear_error(tmp_path: Path, name: str, content: str, message: str) -> None:
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(PdorchError, match=message):
        load_trace(f)


def test_a_conversation_trace_reuses_its_prefixes_in_the_simulator(tmp_path: Path) -> None:
    """Turn n + 1 of a chat repeats turn n's blocks: end to end, the chained ids are cache hits."""
    rows = []
    for chat in range(40):
        blocks: list[int] = []
        for turn in range(3):
            blocks = blocks + [1000 * chat + 10 * turn + k for k in range(8)]  # 8 new blocks a turn
            rows.append(
                {"chat_id": 100 * chat + turn, "parent_chat_id": -1 if turn == 0 else 100 * chat + turn - 1,
                 "timestamp": chat * 0.5 + turn * 4.0, "input_length": 16 * len(blocks), "output_length": 8,
                 "type": "text", "turn": turn + 1, "hash_ids": list(blocks)}
            )  # fmt: skip
    trace = load_trace(_jsonl(tmp_path / "qwen_traceA_blksz_16.jsonl", rows))
    cluster = parse_cluster([], [], ["2:h100"])
    result = simulate(trace, cluster, policy("colocated"), policy_name="colocated")
    assert result.finished == len(rows)
    assert result.prefix_hit_rate > 0.3  # turns 2 and 3 find their earlier turns' blocks
