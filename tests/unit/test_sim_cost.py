"""The simulated engine's cost model and its calibration on the Splitwise measurements."""

from __future__ import annotations

from pathlib import Path

import pytest

from transport.errors import ErrorCode, PdorchError
from workers.engines.sim.calibration import anomalous, fit_all, load_medians
from workers.engines.sim.cost import (
    LLAMA2_70B,
    LLAMA3_8B,
    CostModel,
    fitted_coefficients,
    parse_instance_class,
)

PERF_MODEL = (
    Path(__file__).parents[2] / ".." / "shared" / "traces" / "splitwise_perf_model" / "perf_model.csv"
)


def test_kv_bytes_per_token_of_known_shapes() -> None:
    assert LLAMA2_70B.kv_bytes_per_token == 320 * 1024
    assert LLAMA3_8B.kv_bytes_per_token == 128 * 1024


def test_capacity_from_memory_and_shape() -> None:
    h100 = CostModel("h100", 4)
    # 4 x 80 GB x 0.9 - 138 GB of weights, over 320 KiB per token.
    assert h100.kv_capacity_tokens == int((320e9 * 0.9 - 138e9) // (320 * 1024))
    assert CostModel("l40s", 4).kv_capacity_tokens < h100.kv_capacity_tokens
    # 8B: 272 GB free at 128 KiB per token.
    assert CostModel("h100", 4, LLAMA3_8B).kv_capacity_tokens == int((320e9 * 0.9 - 16.06e9) // (128 * 1024))


@pytest.mark.parametrize(
    ("slower", "faster"),
    [(("a100", 4), ("h100", 4)), (("l40s", 4), ("a100", 4)), (("h100", 2), ("h100", 8))],
)
def test_faster_hardware_is_faster(slower: tuple[str, int], faster: tuple[str, int]) -> None:
    s, f = CostModel(*slower), CostModel(*faster)
    assert s.prefill_ms(0, 4096) > f.prefill_ms(0, 4096)
    assert s.prefill_tokens_per_s() < f.prefill_tokens_per_s()


def test_shape_of_the_model() -> None:
    m = CostModel("h100", 4)
    # Cached positions are skipped, but attention over them still costs (the quadratic term).
    assert m.prefill_ms(0, 2048) > m.prefill_ms(1024, 2048) > m.prefill_ms(0, 1024) - m.a
    assert m.prefill_ms(100, 100) == 0.0
    # Chunks cost more in total than one pass (fixed cost per iteration), never less.
    chunks = sum(m.prefill_ms(s, s + 512) for s in range(0, 4096, 512))
    assert chunks > m.prefill_ms(0, 4096)
    assert m.decode_step_ms(32, 32 * 4096) > m.decode_step_ms(32, 32 * 512) > m.decode_step_ms(1, 512)
    assert m.decode_marginal_ms(8, 1000) == pytest.approx(m.decode_step_ms(8, 1000) - m.d0)
    assert m.decode_step_ms(0, 0) == 0.0


def test_small_model_is_cheaper() -> None:
    assert CostModel("h100", 4, LLAMA3_8B).prefill_ms(0, 2048) < CostModel("h100", 4).prefill_ms(0, 2048) / 5


@pytest.mark.parametrize(
    ("args", "fragment"),
    [(("tpu", 4), "unknown accelerator"), (("h100", 3), "no calibration"), (("l40s", 2), "does not fit")],
)
def test_bad_instances(args: tuple[str, int], fragment: str) -> None:
    with pytest.raises(PdorchError) as info:
        CostModel(*args)
    assert info.value.code is ErrorCode.CONFIG and fragment in info.value.message


@pytest.mark.parametrize(
    ("text", "expected"), [("h100", ("h100", 4)), ("A100x8", ("a100", 8)), ("l40s", ("l40s", 4))]
)
def test_parse_instance_class(text: str, expected: tuple[str, int]) -> None:
    assert parse_instance_class(text) == expected


def test_parse_instance_class_rejects_garbage() -> None:
    with pytest.raises(PdorchError):
        parse_instance_class("h100xfour")


def test_anomaly_rule() -> None:
    medians = {(512, 1, 128): (100.0, 40.0), (512, 2, 128): (200.0, 41.0), (512, 4, 128): (50.0, 39.0)}
    assert anomalous(medians) == {(512, 4, 128)}


@pytest.mark.skipif(
    not PERF_MODEL.exists(), reason="traces/splitwise_perf_model/perf_model.csv not available"
)
def test_baked_coefficients_match_a_refit_of_the_measurements() -> None:
    reports = fit_all(PERF_MODEL)
    baked = fitted_coefficients()
    assert len(reports) == 6
    for r in reports:
        c, b = r.coefficients, baked[(r.accelerator, r.tp)]
        assert c.prefill_fixed_ms == pytest.approx(b.prefill_fixed_ms, rel=1e-3)
        assert c.prefill_per_token_ms == pytest.approx(b.prefill_per_token_ms, rel=1e-3)
        assert c.decode_fixed_ms == pytest.approx(b.decode_fixed_ms, rel=1e-3)
        assert c.decode_per_seq_ms == pytest.approx(b.decode_per_seq_ms, rel=1e-3)
        assert r.decode_mape < 0.05 and r.prefill_mape < 0.2
    # The tensor-parallel-2 batch-64 runs are the anomalies.
    medians = load_medians(PERF_MODEL)
    assert anomalous(medians[("a100", 2)]) == {(512, 64, 128)}
    assert anomalous(medians[("h100", 4)]) == set()
