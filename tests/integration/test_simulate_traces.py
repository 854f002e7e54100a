"""The simulator on slices of the public traces, and the ``pdorch simulate`` entry point."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from scheduler.placement.policies import policy
from simulate.cli import simulate_main
from simulate.cluster import parse_cluster
from simulate.runner import Simulation
from simulate.synthetic import synthetic_trace
from simulate.trace import load_trace

TRACES = Path(__file__).parents[2] / ".." / "shared" / "traces"
AZURE = TRACES / "azure2023" / "AzureLLMInferenceTrace_code.csv"
MOONCAKE = TRACES / "mooncake_fast25" / "synthetic_trace.jsonl"
needs_azure = pytest.mark.skipif(
    not AZURE.exists(), reason="traces/azure2023 (Azure LLM inference trace) not available"
)
needs_mooncake = pytest.mark.skipif(
    not MOONCAKE.exists(), reason="traces/mooncake_fast25 (Mooncake synthetic trace) not available"
)
CLUSTER = parse_cluster(["4:h100"], ["4:a100"])


def _books_nothing(sim: Simulation, worker_id: str) -> bool:
    node = sim.ledger.node(worker_id)
    return node is not None and not (node.held or node.pending or node.members)


def run_slice(path: Path, n: int, name: str, scale: float = 1.0) -> Simulation:
    trace = load_trace(path).head(n)
    sim = Simulation(
        trace, CLUSTER, policy(name, tpot_target_s=0.1, kv_link_gbytes_per_s=100.0), rate_scale=scale
    )
    sim.result = sim.run()  # type: ignore[attr-defined]
    return sim


@needs_azure
@pytest.mark.parametrize("name", ["pdorch", "round-robin", "colocated"])
def test_azure_slice_conserves_requests(name: str) -> None:
    sim = run_slice(AZURE, 800, name, scale=2.0)
    r = sim.result  # type: ignore[attr-defined]
    # Nothing lost: what did not finish was shed on purpose (its TTFT objective was out of reach).
    assert r.finished + r.shed == r.requests == 800 and r.failed == r.shed
    assert r.prefix_hit_rate == 0.0  # the Azure trace has no prompt contents, so no prefix reuse
    assert 0.0 < r.attainment <= 1.0
    assert all(n.engine.idle and _books_nothing(sim, n.worker_id) for n in sim.nodes)


@needs_mooncake
@pytest.mark.parametrize("name", ["pdorch", "prefix-queue", "least-kv"])
def test_mooncake_slice_conserves_requests_and_reuses_prefixes(name: str) -> None:
    sim = run_slice(MOONCAKE, 500, name)
    r = sim.result  # type: ignore[attr-defined]
    assert r.finished + r.shed == r.requests == 500 and r.failed == r.shed
    assert r.prefix_hit_rate > 0.0
    assert all(n.engine.idle and _books_nothing(sim, n.worker_id) for n in sim.nodes)


@needs_mooncake
def test_prefix_aware_placement_reuses_more_of_the_mooncake_prefixes() -> None:
    aware = run_slice(MOONCAKE, 500, "prefix-queue").result  # type: ignore[attr-defined]
    blind = run_slice(MOONCAKE, 500, "round-robin").result  # type: ignore[attr-defined]
    assert aware.prefix_hit_rate > blind.prefix_hit_rate


def test_cli_json_on_a_synthetic_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = synthetic_trace(120, rate_per_s=4.0, seed=5)
    path = tmp_path / "synthetic.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(
                {
                    "timestamp": int(r.arrival_s * 1000),
                    "input_length": r.prompt_len,
                    "output_length": r.output_len,
                    "hash_ids": [h % 100_000 for h in r.hash_ids],
                }
            )
            for r in trace.requests
        )
    )
    argv = ["--trace", str(path), "--prefill", "1:h100", "--decode", "1:a100x4", "--policy", "pdorch,random"]
    assert simulate_main([*argv, "--rate-scale", "1.0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in out["runs"]] == ["pdorch", "random"]
    assert all(r["finished"] == 120 for r in out["runs"])
    assert out["slo"]["tpot_s"] == pytest.approx(0.1)
    # Goodput search (no --rate-scale), text output.
    assert simulate_main([*argv, "--precision", "0.2"]) == 0
    text = capsys.readouterr().out
    assert "goodput" in text and "pdorch" in text and "64 GPUs" not in text


@pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib (the 'plot' extra) not installed"
)
def test_cli_writes_a_png_plot(tmp_path: Path) -> None:
    trace_path = tmp_path / "t.csv"
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    rows += [f"2023-11-16 18:17:{i // 10:02d}.{i % 10}000000,{500 + 37 * i},{5 + i % 20}" for i in range(150)]
    trace_path.write_text("\n".join(rows) + "\n")
    out = tmp_path / "plot.png"
    argv = [
        "--trace",
        str(trace_path),
        "--prefill",
        "1:h100",
        "--decode",
        "1:a100",
        "--policy",
        "least-request",
    ]
    assert simulate_main([*argv, "--rate-scale", "1.0", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--prefill", "2:tpu", "--decode", "1:a100"], "unknown accelerator"),
        (["--prefill", "1:h100", "--decode", "1:a100", "--policy", "psychic"], "unknown placement policy"),
    ],
)
def test_cli_reports_config_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    trace_path = tmp_path / "t.csv"
    trace_path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.0,100,5\n")
    assert simulate_main(["--trace", str(trace_path), *argv, "--rate-scale", "1"]) == 2
    assert fragment in capsys.readouterr().err
