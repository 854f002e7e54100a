"""Placement policies compared in the simulator, plus the cost-model fit and the predictor's accuracy.

Run from the repository root::

    .venv/bin/python bench/simulate_policies.py                 # everything, prints markdown
    .venv/bin/python bench/simulate_policies.py --only goodput --plots docs/img

Sections:

1. the cost model's fit to the Splitwise measurements (error per class and tensor-parallel size);
2. the output-length predictor, online on each trace: MAE and Spearman rank correlation next to
   naive baselines, and its cost per prediction (microseconds, measured here);
3. the simulator's own speed: one full replay of the hour-long Azure trace on a 64-GPU cluster;
4. goodput per policy on each trace at two cluster sizes (4 + 4 and 8 + 8 instances), pdorch's
   ratio to the best baseline, and a summary table;
5. ShareGPT lengths at fixed Poisson arrival rates: attainment per policy;
6. an ablation: pdorch's goodput with one of its ideas switched off at a time;
7. placement's own cost: CPU per decision as the cluster grows (the live scheduler's code).

With ``--adapters N`` every section runs with LoRA adapters: each request draws one of N adapters
(Zipf popularity ``--adapter-zipf``, seeded), every worker serves all N with ``--max-loras`` slots
and pays ``--adapter-load-s`` per load, e.g. the LoRA goodput search of docs/benchmarks.md::

    .venv/bin/python bench/simulate_policies.py --only goodput --shape 4+4 \
        --policy pdorch --policy round-robin --policy least-request \
        --adapters 16 --adapter-zipf 1.0 --max-loras 4 --adapter-load-s 0.1

Traces are read from ``../shared/traces`` relative to the repository root (or ``--traces``); a
trace that is absent is skipped with a message. ShareGPT has no timestamps: 4,000 rows drawn with
seed 0, arriving as a Poisson process at 1 request/s (so its goodput scale reads as requests/s).
The synthetic workloads of ``simulate/synthetic.py`` (2,000 requests each, seed 0, 1 request/s on
average) need no file and run with the traces. Any other trace file (a public trace pdorch was never
run on) goes in with ``--trace-file PATH`` (repeatable; ``--limit N`` reads its first N requests),
alone unless ``--trace`` names others too::

    .venv/bin/python bench/simulate_policies.py --only goodput --trace-file BurstGPT_1.csv --limit 20000
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout, without installing the package

from scheduler.placement.config import PlacementConfig, PluginSpec  # noqa: E402
from scheduler.placement.policies import policies, policy  # noqa: E402
from scheduler.prediction.output_length import OutputLengthPredictor  # noqa: E402
from simulate.adapters import adapter_spec, add_adapter_arguments  # noqa: E402
from simulate.cluster import parse_cluster  # noqa: E402
from simulate.goodput import attainment_curve, find_goodput  # noqa: E402
from simulate.metrics import SimResult  # noqa: E402
from simulate.plot import plot_attainment  # noqa: E402
from simulate.predictor_eval import evaluate, features_of  # noqa: E402
from simulate.runner import SimConfig, Simulation, simulate  # noqa: E402
from simulate.slo import SloSpec  # noqa: E402
from simulate.synthetic import WORKLOADS, workload_trace  # noqa: E402
from simulate.trace import Trace, load_trace  # noqa: E402
from workers.engines.sim.calibration import fit_all  # noqa: E402

TRACES = {
    "azure-code": "azure2023/AzureLLMInferenceTrace_code.csv",
    "mooncake": "mooncake_fast25/synthetic_trace.jsonl",
    "sharegpt": "sharegpt_lengths/sharegpt_8k_filtered_stats_llama2_tokenizer.csv",
    # Public traces that are not in ../shared/traces and that nothing in pdorch was tuned on: put
    # them under --traces DIR from their sources (docs/benchmarks.md) to measure them.
    "azure-conv": "azure2023/AzureLLMInferenceTrace_conv.csv",
    "mooncake-conv": "mooncake_fast25/conversation_trace.jsonl",
}
SHAREGPT_REQUESTS = 4000
PERF_MODEL = "splitwise_perf_model/perf_model.csv"
# Splitwise's heterogeneous design: prefill on H100, decode on A100; instances of 4 GPUs.
SHAPES = {
    "1+1": (["1:h100x4"], ["1:a100x4"]),  # the smallest split cluster (not in the default runs)
    "4+4": (["4:h100x4"], ["4:a100x4"]),
    "8+8": (["8:h100x4"], ["8:a100x4"]),
}
# Policies that are pdorch's own (the rest are the baselines it is measured against).
OURS = ("pdorch", "pdorch-pd")
# ShareGPT at fixed Poisson rates (requests/s) per cluster size.
SHAREGPT_RATES = {
    "1+1": (1.0, 2.0, 3.0, 4.0, 5.0),
    "4+4": (6.0, 8.0, 10.0, 12.0, 14.0),
    "8+8": (12.0, 16.0, 20.0, 24.0, 28.0),
}
DEFAULT_SHAPES = ["4+4", "8+8"]
SLO = SloSpec()
CONFIG = SimConfig()


def section_fit(traces: Path) -> None:
    path = traces / PERF_MODEL
    print("## Cost model fit (Llama-2-70B, Splitwise perf_model.csv)\n")
    if not path.exists():
        print(f"skipped: {path} not found\n")
        return
    print(
        "| class | TP | a ms | b ms/token | d0 ms | d1 ms/seq | prefill MAPE (max) | batched prefill MAPE | "
        "decode MAPE (max) | excluded |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in fit_all(path):
        c = r.coefficients
        print(
            f"| {r.accelerator} | {r.tp} | {c.prefill_fixed_ms:.1f} | {c.prefill_per_token_ms:.4f} | "
            f"{c.decode_fixed_ms:.1f} | {c.decode_per_seq_ms:.3f} | "
            f"{r.prefill_mape:.1%} ({r.prefill_max_error:.0%}) | "
            f"{r.batched_prefill_mape:.1%} | {r.decode_mape:.1%} ({r.decode_max_error:.0%}) | "
            f"{', '.join(f'{p}x{b}' for p, b, _ in r.excluded) or '-'} |"
        )
    print()


def section_predictor(loaded: dict[str, Trace]) -> None:
    print("## Output-length predictor (online: predict, then observe, in trace order)\n")
    print("| trace | predictor | MAE (tokens) | Spearman |")
    print("|---|---|---|---|")
    for name, trace in loaded.items():
        report = evaluate(trace)
        for s in report.scores:
            print(f"| {name} | {s.name} | {s.mae:.1f} | {s.spearman:.3f} |")
        print(f"| {name} | (share of true lengths <= predicted p90) | {report.coverage_p90:.1%} | |")
    for name, trace in loaded.items():
        predictor = OutputLengthPredictor()
        feats = [features_of(r) for r in trace.requests]
        start = time.perf_counter()
        for f, r in zip(feats, trace.requests, strict=True):
            predictor.predict(f)
            predictor.observe(f, r.output_len)
        per = (time.perf_counter() - start) / len(feats) * 1e6
        print(f"\n{name}: predict + observe = {per:.0f} us per request (this machine)")
    print()


def section_speed(loaded: dict[str, Trace]) -> None:
    print("## Simulator speed\n")
    trace = loaded.get("azure-code")
    if trace is None:
        print("skipped: Azure trace not found\n")
        return
    prefill, decode = SHAPES["8+8"]
    cluster = parse_cluster(prefill, decode)
    for name in ("pdorch", "round-robin"):
        start = time.perf_counter()
        r = simulate(trace, cluster, _policy(name), SLO, CONFIG, policy_name=name)
        wall = time.perf_counter() - start
        print(
            f"- {name}: {r.requests} requests, {trace.duration_s / 3600:.2f} h of trace on "
            f"{cluster.gpus} GPUs in {wall:.1f} s wall ({r.attainment:.1%} attainment at 1x)"
        )
    print()


def _policy(name: str):
    return policy(name, tpot_target_s=SLO.tpot_s, kv_link_gbytes_per_s=CONFIG.link_gbytes_per_s)


def _progress(r: SimResult) -> None:
    """One line per replay on stderr, so a search cut short still shows the bounds it reached."""
    verdict = "stopped early" if r.aborted else f"{r.attainment:.1%}"
    print(
        f"  {r.policy} {r.trace} {r.cluster}: scale {r.rate_scale:.3f} -> {verdict}",
        file=sys.stderr,
        flush=True,
    )


def section_goodput(
    loaded: dict[str, Trace], precision: float, plots: Path | None, shapes: list[str], names: list[str]
) -> None:
    print("## Goodput per policy (highest rate scale with >= 90% of requests meeting both SLOs)\n")
    print(
        f"SLOs: {SLO.describe()}; KV link {CONFIG.link_gbytes_per_s:g} GB/s per instance; "
        f"model {CONFIG.model}.\n"
    )
    lora = CONFIG.adapters
    if lora.count:
        print(
            f"LoRA: {lora.count} adapters, Zipf exponent {lora.zipf:g}, {lora.max_loras} slots per "
            f"worker, {lora.load_s:g} s per load, seed {lora.seed}.\n"
        )
    summary: list[tuple[str, str, float, str, float]] = []
    for shape in shapes:
        prefill, decode = SHAPES[shape]
        cluster = parse_cluster(prefill, decode)
        for name, trace in loaded.items():
            print(f"### {name}, {shape} ({cluster.gpus} GPUs)\n", flush=True)
            print(
                "| policy | goodput (x trace rate) | req/s | attainment | TTFT p90 s | TPOT p90 ms | KV GB | "
                "prefix hit | colocated | shed | TTFT / TPOT prediction error | adapter loads | runs |"
            )
            print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            results = {}
            for pname in names:
                g = find_goodput(
                    trace,
                    cluster,
                    _policy(pname),
                    SLO,
                    CONFIG,
                    policy_name=pname,
                    precision=precision,
                    on_run=_progress,
                )
                results[pname] = g
                r = g.at_goodput
                if r is None:
                    print(f"| {pname} | 0 | 0 | - | - | - | - | - | - | - | - | - | {g.runs} |")
                    continue
                errors = (
                    f"{r.ttft_prediction_error:.0%} / {r.tpot_prediction_error:.0%}"
                    if r.ttft_prediction_error == r.ttft_prediction_error  # not nan
                    else "-"
                )
                print(
                    f"| {pname} | {g.goodput_scale:.2f} | {g.goodput_rps:.2f} | {r.attainment:.1%} | "
                    f"{r.ttft_p90_s:.2f} | {r.tpot_p90_s * 1e3:.0f} | {r.kv_transfer_gb:.0f} | "
                    f"{r.prefix_hit_rate:.0%} | {r.local_prefills} | {r.shed} | {errors} | "
                    f"{r.adapter_loads} | {g.runs} |"
                )
            baselines = [g for n, g in results.items() if n not in OURS]
            if "pdorch" in results and baselines:  # a --policy subset may lack either
                best = max(baselines, key=lambda g: g.goodput_scale)
                ours = results["pdorch"].goodput_scale
                ratio = ours / best.goodput_scale if best.goodput_scale > 0 else float("inf")
                summary.append((name, shape, ours, best.policy, best.goodput_scale))
                print(f"\npdorch / best baseline ({best.policy}): **{ratio:.2f}x**\n")
            if plots is not None:
                anchor = max(g.goodput_scale for g in results.values())
                scales = [anchor * f for f in (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)]
                curves = {
                    pname: attainment_curve(
                        trace, cluster, _policy(pname), scales, SLO, CONFIG, policy_name=pname
                    )
                    for pname in names
                }
                out = plot_attainment(
                    curves,
                    SLO.target,
                    plots / f"attainment-{name}-{shape.replace('+', 'p')}.png",
                    f"{name}: {cluster.describe()}\n{SLO.describe()}",
                )
                print(f"plot: {out}\n")
    print("### Summary\n")
    print("| trace | cluster | pdorch | best baseline | its goodput | ratio |")
    print("|---|---|---|---|---|---|")
    for name, shape, ours, best_name, best_scale in summary:
        ratio = ours / best_scale if best_scale > 0 else float("inf")
        print(f"| {name} | {shape} | {ours:.2f} | {best_name} | {best_scale:.2f} | **{ratio:.2f}x** |")
    print()


def section_rates(loaded: dict[str, Trace], shapes: list[str], names: list[str]) -> None:
    print("## ShareGPT lengths at fixed Poisson arrival rates (share of requests meeting both SLOs)\n")
    trace = loaded.get("sharegpt")
    if trace is None:
        print("skipped: ShareGPT lengths not found\n")
        return
    for shape in shapes:
        prefill, decode = SHAPES[shape]
        cluster = parse_cluster(prefill, decode)
        rates = SHAREGPT_RATES[shape]
        print(f"### {shape} ({cluster.gpus} GPUs)\n")
        print("| policy | " + " | ".join(f"{r:g} req/s" for r in rates) + " |")
        print("|---|" + "---|" * len(rates))
        for pname in names:
            cells = []
            for rate in rates:
                r = simulate(trace, cluster, _policy(pname), SLO, CONFIG, policy_name=pname, rate_scale=rate)
                cells.append(f"{r.attainment:.1%}")
            print(f"| {pname} | " + " | ".join(cells) + " |")
        print()


def _with_params(spec: PluginSpec, **params: object) -> PluginSpec:
    return msgspec.structs.replace(spec, params={**spec.params, **params})


def _ablations() -> dict[str, PlacementConfig]:
    full = _policy("pdorch")
    replace = msgspec.structs.replace
    return {
        "pdorch (all)": full,
        "- tiers (most headroom wherever it is)": replace(
            full, handler=_with_params(full.handler, tiers=False)
        ),
        "- shedding (place what cannot meet its TTFT)": replace(
            full, handler=_with_params(full.handler, shed=False)
        ),
        "- decode nodes prefilling": replace(full, handler=_with_params(full.handler, colocate=False)),
        "- prefill nodes decoding": replace(full, fallback_to_prefill_node=False),
        "- scorers (ties drawn at random)": replace(
            full,
            decode=replace(full.decode, scorers=()),
            prefill=replace(full.prefill, scorers=()),
        ),
        "- late binding (max_prefill_wait_s: 0)": replace(
            full, handler=_with_params(full.handler, max_prefill_wait_s=0.0)
        ),
    }


def section_ablation(loaded: dict[str, Trace], precision: float, shape: str, only: list[str] | None) -> None:
    print(f"## Ablation: pdorch with one idea off (goodput, x trace rate, {shape})\n")
    prefill, decode = SHAPES[shape]
    cluster = parse_cluster(prefill, decode)
    variants = {k: v for i, (k, v) in enumerate(_ablations().items()) if only is None or str(i) in only}
    print("| variant | " + " | ".join(loaded) + " |")
    print("|---|" + "---|" * len(loaded))
    for label, config in variants.items():
        cells = []
        for trace in loaded.values():
            g = find_goodput(
                trace, cluster, config, SLO, CONFIG, policy_name=label, precision=precision, on_run=_progress
            )
            cells.append(f"{g.goodput_scale:.2f}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()


# Where placement.sample (8) takes a sample: every class over 8 (16 + 16), and a heterogeneous
# cluster whose larger classes are over it and smaller ones not (16 + 20).
SAMPLE_SHAPES = {
    "16+16": (["16:h100x4"], ["16:a100x4"]),
    "16+20": (["10:h100x4", "6:a100x4"], ["12:a100x4", "8:l40sx4"]),
}


def section_sample(loaded: dict[str, Trace], precision: float, seeds: int) -> None:
    """pdorch's goodput deciding on a sample of a large cluster against looking at every node."""
    print("## Placement on a sample against every node (goodput, x trace rate)\n")
    print("| shape | trace | every node | sample |")
    print("|---|---|---:|---:|")
    for shape, (prefill, decode) in SAMPLE_SHAPES.items():
        cluster = parse_cluster(prefill, decode)
        for name, trace in loaded.items():
            cells = []
            for k in (0, _policy("pdorch").sample):
                found = []
                for seed in range(seeds):
                    config = msgspec.structs.replace(_policy("pdorch"), sample=k, seed=seed)
                    g = find_goodput(
                        trace, cluster, config, SLO, CONFIG, policy_name=f"sample {k}", precision=precision
                    )
                    found.append(f"{g.goodput_scale:.2f}")
                cells.append(" / ".join(found))
            print(f"| {shape} | {name} | " + " | ".join(cells) + " |", flush=True)
    print()


# Synthetic chat at this many requests/s per prefill + decode pair: ~80% of pdorch's goodput at 4 + 4.
COST_RATE_PER_PAIR = 7.0


def _timed(fn: Callable[..., Any], spent: dict[str, float], key: str) -> Callable[..., Any]:
    """``fn``, adding its CPU time to ``spent[key]`` and its calls to ``spent[key + " calls"]``."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[key] = spent.get(key, 0.0) + time.process_time() - start
            spent[key + " calls"] = spent.get(key + " calls", 0) + 1

    return timed


def section_cost(sizes: list[int]) -> None:
    """What one placement decision costs as the cluster grows, per request at the same load per
    node: the scheduler runs this code once per request (again for one that waits, each time room
    may have appeared), so it bounds the requests/s one scheduler core can place."""
    print("## Placement cost per decision\n")
    print(
        f"Synthetic chat at {COST_RATE_PER_PAIR:g} requests/s per prefill + decode pair (H100 + A100), "
        "CPU per decision of the scheduler's `Planner.decide` (the simulator's own node reports "
        "excluded), on this machine.\n"
    )
    print(
        "| nodes | policy | decisions per request | us per decision | requests/s per core | attainment "
        "| decisions on a sample |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    trace = workload_trace("synthetic-chat")
    # pdorch as configured (a sample of each pool past placement.sample nodes of a class), pdorch
    # looking at every node, and the cheapest reference in the same framework.
    variants = {
        "pdorch": _policy("pdorch"),
        "pdorch, every node": msgspec.structs.replace(_policy("pdorch"), sample=0),
        "least-request": _policy("least-request"),
    }
    for n in sizes:
        for name, config in variants.items():
            cluster = parse_cluster([f"{n}:h100x4"], [f"{n}:a100x4"])
            sim = Simulation(
                trace,
                cluster,
                config,
                SLO,
                CONFIG,
                policy_name=name,
                rate_scale=COST_RATE_PER_PAIR * n,
            )
            spent: dict[str, float] = {}
            sim.planner.decide = _timed(sim.planner.decide, spent, "decide")  # type: ignore[method-assign]
            sim.node_states = _timed(sim.node_states, spent, "reports")  # type: ignore[method-assign]
            r = sim.run()
            decisions = max(1, int(spent["decide calls"]))
            per = (spent["decide"] - spent["reports"]) / decisions
            per_request = per * decisions / max(1, r.requests)
            print(
                f"| {2 * n} | {name} | {decisions / max(1, r.requests):.2f} | {per * 1e6:.0f} "
                f"| {1 / per_request if per_request > 0 else float('inf'):,.0f} | {r.attainment:.1%} "
                f"| {sim.planner.scope['sample'] / decisions:.0%} |"
            )
    print()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--traces", type=Path, default=REPO / ".." / "shared" / "traces")
    p.add_argument(
        "--only",
        choices=["fit", "predictor", "speed", "goodput", "rates", "ablation", "cost", "sample"],
        default=None,
    )
    p.add_argument("--precision", type=float, default=0.03)
    p.add_argument("--seeds", type=int, default=1, help="--only sample: placement seeds per search")
    p.add_argument(
        "--shape", choices=list(SHAPES), action="append", help="cluster size (default: 4+4 and 8+8)"
    )
    p.add_argument(
        "--trace",
        choices=[*TRACES, *WORKLOADS],
        action="append",
        help="trace or synthetic workload (default: all, or none when --trace-file is given)",
    )
    p.add_argument(
        "--trace-file",
        type=Path,
        action="append",
        default=[],
        help="any trace file pdorch simulate reads (Azure, BurstGPT, Mooncake, Qwen-Bailian, ShareGPT "
        "lengths; .gz too), named by its file name; repeatable",
    )
    p.add_argument("--limit", type=int, default=0, help="--trace-file: only the file's first N requests")
    p.add_argument("--policy", choices=list(policies()), action="append", help="policy (default: all)")
    p.add_argument(
        "--variant",
        choices=[str(i) for i in range(len(_ablations()))],
        action="append",
        help="ablation variant by index, 0 = all of pdorch (default: every variant)",
    )
    p.add_argument("--plots", type=Path, default=None, help="directory for attainment-vs-rate PNGs")
    add_adapter_arguments(p)
    args = p.parse_args()
    if args.adapters:
        global CONFIG
        CONFIG = msgspec.structs.replace(CONFIG, adapters=adapter_spec(args))
    names = args.policy or list(policies())
    loaded = {}
    for name, rel in TRACES.items():
        if (args.trace and name not in args.trace) or (args.trace_file and not args.trace):
            continue
        path = args.traces / rel
        if path.exists():
            loaded[name] = load_trace(path, requests=SHAREGPT_REQUESTS, rate_per_s=1.0, seed=0)
        else:
            print(f"note: {name} trace not found at {path}; its sections are skipped\n")
    for name in WORKLOADS:
        if (not args.trace and not args.trace_file) or (args.trace and name in args.trace):
            loaded[name] = workload_trace(name)
    for path in args.trace_file:
        trace = load_trace(path, requests=SHAREGPT_REQUESTS, rate_per_s=1.0, seed=0, limit=args.limit)
        loaded[trace.name] = trace
    if args.only in (None, "fit"):
        section_fit(args.traces)
    if args.only in (None, "predictor"):
        section_predictor(loaded)
    if args.only in (None, "speed"):
        section_speed(loaded)
    if args.only in (None, "goodput"):
        section_goodput(loaded, args.precision, args.plots, args.shape or DEFAULT_SHAPES, names)
    if args.only in (None, "rates"):
        section_rates(loaded, args.shape or DEFAULT_SHAPES, names)
    if args.only in (None, "ablation"):
        section_ablation(loaded, args.precision, (args.shape or ["4+4"])[0], args.variant)
    if args.only in (None, "cost"):
        section_cost([1, 4, 16, 64, 128])
    if args.only == "sample":  # ~1 hour with one seed: not in the default run
        section_sample(loaded, args.precision, args.seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
