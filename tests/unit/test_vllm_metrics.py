"""vLLM /metrics parsing, on a page scraped from a real vLLM 0.32 CPU server (tests/vllm_support)."""

from __future__ import annotations

from pathlib import Path

import pytest

from transport.errors import ErrorCode, PdorchError
from workers.engines.vllm.engine import kv_bytes_per_token
from workers.engines.vllm.metrics import parse_metrics

PAGE = Path(__file__).parents[1] / "vllm_support" / "vllm_metrics_page.txt"


def _with(page: str, name: str, value: float) -> str:
    lines = [
        f"{line.rsplit(' ', 1)[0]} {value}" if line.startswith(name + "{") else line
        for line in page.splitlines()
    ]
    return "\n".join(lines) + "\n"


def test_real_page_gives_pool_size_and_idle_load() -> None:
    m = parse_metrics(PAGE.read_text())
    assert m.block_size == 32
    assert m.num_blocks == 32768
    assert (m.running, m.waiting, m.blocks_used) == (0, 0, 0)
    assert m.prefix_cache_queries > 0
    load = m.to_load()
    assert load.blocks_total == 32768 and load.blocks_used == 0


def test_usage_fraction_becomes_blocks_and_queues_are_read() -> None:
    page = PAGE.read_text()
    page = _with(page, "vllm:kv_cache_usage_perc", 0.25)
    page = _with(page, "vllm:num_requests_running", 3)
    page = _with(page, "vllm:num_requests_waiting", 5)
    page = _with(page, "vllm:prefix_cache_hits_total", 6)
    m = parse_metrics(page)
    assert m.blocks_used == 8192
    assert (m.running, m.waiting) == (3, 5)
    assert m.prefix_hit_rate == pytest.approx(6 / m.prefix_cache_queries)
    load = m.to_load()
    assert (load.blocks_used, load.running, load.waiting) == (8192, 3, 5)


def test_lora_adapters_in_use_and_slots_come_from_the_newest_lora_info_sample() -> None:
    """vLLM keeps every label set the gauge ever had, each set to the time of its change."""
    samples = [("sql,poem", "", 100.5), ("poem", "sql,x", 200.25), ("", "", 150.0)]
    lora = "# TYPE vllm:lora_requests_info gauge\n" + "".join(
        f'vllm:lora_requests_info{{max_lora="4",running_lora_adapters="{r}",'
        f'waiting_lora_adapters="{w}"}} {t}\n'
        for r, w, t in samples
    )
    load = parse_metrics(PAGE.read_text() + lora).to_load()
    assert load.adapter_slots == 4
    assert load.adapters_resident == ["poem", "sql", "x"]
    assert parse_metrics(PAGE.read_text()).to_load().adapter_slots == 0, "no LoRA: no slots"


def test_two_engines_are_pooled() -> None:
    page = PAGE.read_text()
    second = page.replace('engine="0"', 'engine="1"')
    # Prometheus text may not repeat a family; keep only the second engine's samples.
    samples = [line for line in second.splitlines() if line and not line.startswith("#")]
    merged = []
    for line in page.splitlines():
        merged.append(line)
        if line and not line.startswith("#"):
            name = line.split("{", 1)[0]
            merged += [s for s in samples if s.split("{", 1)[0] == name and s not in merged]
    m = parse_metrics("\n".join(merged) + "\n")
    assert m.num_blocks == 2 * 32768


def test_cache_bytes_per_token_from_labels() -> None:
    labels = {"kv_cache_memory_bytes": "1073741824", "kv_cache_size_tokens": "1048576"}
    assert kv_bytes_per_token(labels, None) == 1024
    assert kv_bytes_per_token({}, None) == 0


@pytest.mark.parametrize("page", ["", "# just a comment\n", "some_other_metric 1\n"])
def test_a_page_without_vllm_metrics_is_rejected(page: str) -> None:
    with pytest.raises(PdorchError) as e:
        parse_metrics(page)
    assert e.value.code is ErrorCode.BAD_MESSAGE
