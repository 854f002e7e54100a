"""The load generators users point at an OpenAI server, as this bench runs and reads them.

Each builds the command line of one run of a given workload shape and reads the figures that run
wrote (its own JSON), as the tool itself computed them (only guidellm's duration is derived: its
request count over its request rate).

- ``vllm bench serve``, from vLLM's virtualenv (``bench/vllm_bench_serve.py``): random prompts of
  exactly ``input_tokens`` tokens (by the model's tokenizer), ``ignore_eos`` so every answer has
  ``output_tokens`` tokens, streamed from ``/v1/completions``.
- guidellm, from a virtualenv of the bench's own: synthetic prompts of ``input_tokens`` tokens (by
  the same tokenizer), ``output_tokens`` per answer, streamed from ``/v1/completions``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

REPO_ROOT = Path(__file__).resolve().parents[1]
GUIDELLM = {"guidellm": "0.8.1"}


@dataclass(frozen=True)
class Workload:
    input_tokens: int
    output_tokens: int
    prompts: int
    concurrency: int
    seed: int = 0


@dataclass(frozen=True)
class Figures:
    """What one client reported for one run; times in seconds, (mean, p50, p99)."""

    requests: int
    failed: int
    duration_s: float
    ttft_s: tuple[float, float, float]
    tpot_s: tuple[float, float, float]
    req_per_s: float
    output_tok_per_s: float
    input_tokens: int
    output_tokens: int


class Client(Protocol):
    name: str

    def argv(self, url: str, model: str, tokenizer: str, w: Workload, out: Path) -> list[str]: ...

    def read(self, out: Path) -> Figures: ...


class VllmBenchServe:
    name = "vllm bench serve"

    def __init__(self, python: Path) -> None:
        self.python = python

    def argv(self, url: str, model: str, tokenizer: str, w: Workload, out: Path) -> list[str]:
        return [
            str(self.python), str(REPO_ROOT / "bench" / "vllm_bench_serve.py"),
            "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
            "--model", model, "--tokenizer", tokenizer,
            "--dataset-name", "random", "--random-input-len", str(w.input_tokens),
            "--random-output-len", str(w.output_tokens), "--random-range-ratio", "0",
            "--num-prompts", str(w.prompts), "--max-concurrency", str(w.concurrency),
            "--ignore-eos", "--seed", str(w.seed), "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "99", "--disable-tqdm",
            "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name,
        ]  # fmt: skip

    def read(self, out: Path) -> Figures:
        r = json.loads(out.read_text())

        def ms(metric: str) -> tuple[float, float, float]:
            return (r[f"mean_{metric}_ms"] / 1e3, r[f"median_{metric}_ms"] / 1e3, r[f"p99_{metric}_ms"] / 1e3)

        return Figures(
            requests=r["completed"],
            failed=r["failed"],
            duration_s=r["duration"],
            ttft_s=ms("ttft"),
            tpot_s=ms("tpot"),
            req_per_s=r["request_throughput"],
            output_tok_per_s=r["output_throughput"],
            input_tokens=r["total_input_tokens"],
            output_tokens=r["total_output_tokens"],
        )


class GuideLLM:
    name = "guidellm"

    def __init__(self, python: Path) -> None:
        self.python = python

    def argv(self, url: str, model: str, tokenizer: str, w: Workload, out: Path) -> list[str]:
        return [
            str(self.python.with_name("guidellm")), "run",
            "--backend", f"kind=openai_http,target={url},model={model},request_format=/v1/completions",
            "--profile", f"kind=concurrent,streams={w.concurrency}",
            "--constraint", f"kind=max_requests,count={w.prompts}",
            "--tokenizer", f"kind=hf_auto,model={tokenizer}",
            "--data", f"kind=synthetic_text,prompt_tokens={w.input_tokens},output_tokens={w.output_tokens}",
            "--seed", f"kind=static,value={w.seed}",
            "--output", f"kind=json,path={out}", "--disable-console-interactive",
        ]  # fmt: skip

    def read(self, out: Path) -> Figures:
        m = json.loads(out.read_text())["benchmarks"][0]["metrics"]

        def stat(metric: str) -> dict[str, Any]:
            return m[metric]["successful"]

        def ms(metric: str) -> tuple[float, float, float]:
            s = stat(metric)
            return (s["mean"] / 1e3, s["median"] / 1e3, s["percentiles"]["p99"] / 1e3)

        totals = m["request_totals"]
        return Figures(
            requests=totals["successful"],
            failed=totals["errored"] + totals["incomplete"],
            duration_s=totals["successful"] / stat("requests_per_second")["mean"],
            ttft_s=ms("time_to_first_token_ms"),
            # guidellm's "TPOT" is a request's whole latency over its tokens (TTFT included); its
            # inter-token latency is what vLLM and pdorch call TPOT.
            tpot_s=ms("inter_token_latency_ms"),
            req_per_s=stat("requests_per_second")["mean"],
            output_tok_per_s=stat("output_tokens_per_second")["mean"],
            input_tokens=round(stat("prompt_token_count")["total_sum"]),
            output_tokens=round(stat("output_token_count")["total_sum"]),
        )
