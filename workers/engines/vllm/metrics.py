"""vLLM's Prometheus ``/metrics`` page -> pdorch's :class:`~transport.messages.Load`.

vLLM reports KV occupancy as a fraction (``vllm:kv_cache_usage_perc``, 0..1) and its pool size in
the labels of ``vllm:cache_config_info`` (``num_gpu_blocks``, ``block_size``; the "gpu" name is
kept on CPU). Queue depth is ``vllm:num_requests_running`` / ``_waiting``. Counters for the
prefix cache give a hit rate. Pages from several engines (data parallel) are summed.

LoRA: ``vllm:lora_requests_info`` is a gauge whose labels carry ``max_lora`` and the adapters of
running and waiting requests, set to the time of each change; the page keeps every label set it
ever had, so the newest sample is the current one. vLLM does not publish which adapters its LRU
holds, so the adapters in use now stand for the resident ones.
"""

from __future__ import annotations

import msgspec
from prometheus_client.parser import text_string_to_metric_families

from transport.errors import ErrorCode, PdorchError
from transport.messages import Load


class VllmMetrics(msgspec.Struct, frozen=True):
    """The figures pdorch uses from one scrape."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    block_size: int = 0
    num_blocks: int = 0
    prefix_cache_queries: float = 0.0
    prefix_cache_hits: float = 0.0
    max_loras: int = 0
    lora_adapters: tuple[str, ...] = ()

    @property
    def blocks_used(self) -> int:
        return round(self.kv_usage * self.num_blocks)

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def to_load(self) -> Load:
        # vLLM counts cached-but-unreferenced blocks as free, so blocks_used holds no cached
        # prefixes and cached_blocks stays 0.
        return Load(
            blocks_used=self.blocks_used,
            blocks_total=self.num_blocks,
            running=self.running,
            waiting=self.waiting,
            adapter_slots=self.max_loras,
            adapters_resident=list(self.lora_adapters),
        )


def _int_label(labels: dict[str, str], name: str) -> int:
    try:
        return int(labels.get(name, "0"))
    except ValueError:
        return 0  # "None" when vLLM has not resolved it


def parse_metrics(text: str) -> VllmMetrics:
    """Parse one ``/metrics`` page. Raises ``PdorchError(BAD_MESSAGE)`` if it is not a vLLM page."""
    running = waiting = 0.0
    usage_sum = 0.0
    usage_n = 0
    block_size = num_blocks = 0
    queries = hits = 0.0
    seen = False
    lora_at, max_loras, lora_adapters = -1.0, 0, ()
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as e:  # the parser raises ValueError, IndexError, ... on malformed text
        raise PdorchError(ErrorCode.BAD_MESSAGE, f"unparseable metrics page: {e}") from None
    for family in families:
        for sample in family.samples:
            name, value = sample.name, sample.value
            if name == "vllm:num_requests_running":
                running += value
                seen = True
            elif name == "vllm:num_requests_waiting":
                waiting += value
            elif name == "vllm:kv_cache_usage_perc":
                usage_sum += value
                usage_n += 1
            elif name == "vllm:cache_config_info":
                block_size = _int_label(sample.labels, "block_size") or block_size
                num_blocks += _int_label(sample.labels, "num_gpu_blocks")
            elif name == "vllm:prefix_cache_queries_total":
                queries += value
            elif name == "vllm:prefix_cache_hits_total":
                hits += value
            elif name == "vllm:lora_requests_info" and value > lora_at:
                lora_at, max_loras, lora_adapters = (
                    value,
                    _int_label(sample.labels, "max_lora"),
                    _lora_names(sample.labels),
                )
    if not seen:
        raise PdorchError(ErrorCode.BAD_MESSAGE, "metrics page has no vllm:num_requests_running")
    return VllmMetrics(
        running=int(running),
        waiting=int(waiting),
        # Every engine has the same pool size, so the mean fraction is the pooled fraction.
        kv_usage=usage_sum / usage_n if usage_n else 0.0,
        block_size=block_size,
        num_blocks=num_blocks,
        prefix_cache_queries=queries,
        prefix_cache_hits=hits,
        max_loras=max_loras,
        lora_adapters=lora_adapters,
    )


def _lora_names(labels: dict[str, str]) -> tuple[str, ...]:
    """The adapters of running, then waiting, requests (comma-separated labels), each once."""
    names: dict[str, None] = {}
    for key in ("running_lora_adapters", "waiting_lora_adapters"):
        names.update((n, None) for n in labels.get(key, "").split(",") if n)
    return tuple(names)
