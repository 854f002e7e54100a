"""``pdorch simulate``: replay a trace on a simulated cluster and report latency, SLO attainment, goodput.

Examples::

    pdorch simulate --trace azure.csv --prefill 8:h100 --decode 8:a100 --policy pdorch,prefix-queue
    pdorch simulate --trace mooncake.jsonl --prefill 8:h100x4 --decode 8:a100x4 --policy all \\
        --rate-scale 1.5 --json
    pdorch simulate --trace azure.csv --prefill 8:h100 --decode 8:a100 --policy all --plot out.png
    pdorch simulate --trace azure.csv --prefill 4:h100x4 --decode 4:a100x4 --policy pdorch,round-robin \
        --adapters 16 --adapter-zipf 1.0 --max-loras 4 --adapter-load-s 0.1

Without ``--rate-scale`` each policy's goodput is searched (the highest rate scale at which the SLO
target is met) and the run at that scale is reported; with it, one run per policy at that scale.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import msgspec

from scheduler.placement.policies import policies, policy
from simulate.adapters import adapter_spec, add_adapter_arguments
from simulate.cluster import ClusterSpec, parse_cluster
from simulate.goodput import GoodputResult, attainment_curve, find_goodput
from simulate.metrics import SimResult
from simulate.plot import plot_attainment
from simulate.runner import SimConfig, simulate
from simulate.slo import SloSpec
from simulate.trace import Trace, load_trace
from transport.errors import PdorchError

PLOT_POINTS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdorch simulate", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--trace",
        required=True,
        type=Path,
        help="Azure (2023, 2024), BurstGPT or ShareGPT-lengths CSV, Mooncake or Qwen-Bailian JSONL; or .gz",
    )
    pool = "N:CLASS[xTP][@SLOWDOWN]"  # @2: instances of the class at half its speed (degraded)
    p.add_argument("--prefill", action="append", default=[], metavar=pool, help="prefill pool")
    p.add_argument("--decode", action="append", default=[], metavar=pool, help="decode pool")
    p.add_argument("--both", action="append", default=[], metavar=pool, help="colocated nodes")
    p.add_argument("--policy", default="pdorch", help=f"comma-separated, or 'all': {', '.join(policies())}")
    p.add_argument("--rate-scale", type=float, default=None, help="one run at this arrival-rate scale")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("--plot", type=Path, default=None, metavar="OUT.png", help="attainment vs rate plot")
    p.add_argument("--tp", type=int, default=4, help="tensor-parallel size when a class has no xTP")
    p.add_argument("--model", default="llama-2-70b", help="model shape (llama-2-70b, llama-3-8b)")
    p.add_argument("--limit", type=int, default=0, help="replay only the file's first N requests")
    p.add_argument(
        "--requests", type=int, default=4000, help="traces without timestamps (ShareGPT): requests to draw"
    )
    p.add_argument(
        "--arrival-rate",
        type=float,
        default=1.0,
        help="traces without timestamps: Poisson arrivals per second",
    )
    p.add_argument("--seed", type=int, default=0, help="traces without timestamps: sample and arrival seed")
    p.add_argument("--ttft-base-s", type=float, default=SloSpec().ttft_base_s)
    p.add_argument("--ttft-scale", type=float, default=SloSpec().ttft_scale)
    p.add_argument("--tpot-ms", type=float, default=SloSpec().tpot_s * 1e3)
    p.add_argument("--target", type=float, default=SloSpec().target, help="share of requests meeting SLOs")
    p.add_argument("--link-gbytes-per-s", type=float, default=SimConfig().link_gbytes_per_s)
    p.add_argument("--chunk-tokens", type=int, default=0, help="chunked-prefill size (0 = from TPOT SLO)")
    p.add_argument("--precision", type=float, default=0.03, help="relative precision of the goodput search")
    add_adapter_arguments(p)
    return p


def simulate_main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(argv) if argv is not None else None)
    try:
        return _run(args)
    except PdorchError as e:
        print(f"pdorch simulate: error: {e.message}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    trace = load_trace(
        args.trace,
        requests=args.requests,
        rate_per_s=args.arrival_rate,
        seed=args.seed,
        limit=args.limit,
    )
    if args.limit > 0:  # a trace without timestamps draws --requests rows whatever the limit
        trace = trace.head(args.limit)
    cluster = parse_cluster(args.prefill, args.decode, args.both, default_tp=args.tp)
    slo = SloSpec(
        ttft_base_s=args.ttft_base_s,
        ttft_scale=args.ttft_scale,
        tpot_s=args.tpot_ms / 1e3,
        target=args.target,
    )
    adapters = adapter_spec(args)
    config = SimConfig(
        model=args.model,
        link_gbytes_per_s=args.link_gbytes_per_s,
        chunk_tokens=args.chunk_tokens,
        adapters=adapters,
    )
    names = (
        list(policies()) if args.policy == "all" else [n.strip() for n in args.policy.split(",") if n.strip()]
    )
    configs = {
        n: policy(n, tpot_target_s=slo.tpot_s, kv_link_gbytes_per_s=config.link_gbytes_per_s) for n in names
    }

    results: list[SimResult] = []
    searches: list[GoodputResult] = []
    for name, placement in configs.items():
        if args.rate_scale is not None:
            results.append(
                simulate(trace, cluster, placement, slo, config, policy_name=name, rate_scale=args.rate_scale)
            )
        else:
            g = find_goodput(
                trace, cluster, placement, slo, config, policy_name=name, precision=args.precision
            )
            searches.append(g)
            if g.at_goodput is not None:
                results.append(g.at_goodput)

    if args.plot is not None:
        _plot(args, trace, cluster, configs, slo, config, searches)
    if args.json:
        print(
            json.dumps(
                {
                    "slo": msgspec.to_builtins(slo),
                    "goodput": msgspec.to_builtins(searches),
                    "runs": msgspec.to_builtins(results),
                },
                indent=2,
            )
        )
    else:
        _print_text(trace, cluster, slo, config, searches, results)
    return 0


def _plot(
    args: argparse.Namespace,
    trace: Trace,
    cluster: ClusterSpec,
    configs: dict,
    slo: SloSpec,
    config: SimConfig,
    searches: list[GoodputResult],
) -> None:
    anchor = args.rate_scale or max((g.goodput_scale for g in searches), default=1.0) or 1.0
    scales = [anchor * f for f in PLOT_POINTS]
    curves = {
        name: attainment_curve(trace, cluster, placement, scales, slo, config, policy_name=name)
        for name, placement in configs.items()
    }
    title = f"{trace.name}: {cluster.describe()}\n{slo.describe()}"
    out = plot_attainment(curves, slo.target, args.plot, title)
    print(f"wrote {out}", file=sys.stderr)


def _print_text(
    trace: Trace,
    cluster: ClusterSpec,
    slo: SloSpec,
    config: SimConfig,
    searches: list[GoodputResult],
    results: list[SimResult],
) -> None:
    print(f"trace {trace.name}: {len(trace.requests)} requests over {trace.duration_s:.0f} s")
    print(f"cluster: {cluster.describe()}")
    print(f"SLO: {slo.describe()}")
    if config.adapters.count:
        a = config.adapters
        print(f"LoRA: {a.count} adapters, Zipf {a.zipf:g}, {a.max_loras} slots, {a.load_s:g} s per load")
    if searches:
        print()
        print(f"{'policy':14s} {'goodput':>9s} {'req/s':>8s} {'runs':>5s}")
        for g in searches:
            print(f"{g.policy:14s} {g.goodput_scale:8.2f}x {g.goodput_rps:8.2f} {g.runs:5d}")
    print()
    header = (
        f"{'policy':14s} {'scale':>6s} {'req/s':>6s} {'attain':>7s} {'TTFT p50/p90/p99 s':>20s} "
        f"{'TPOT p50/p90/p99 ms':>20s} {'KV GB':>8s} {'preempt':>7s} {'local':>6s} {'hit':>5s}"
    )
    print(header)
    for r in results:
        ttft = f"{r.ttft_p50_s:.2f}/{r.ttft_p90_s:.2f}/{r.ttft_p99_s:.2f}"
        tpot = f"{r.tpot_p50_s * 1e3:.0f}/{r.tpot_p90_s * 1e3:.0f}/{r.tpot_p99_s * 1e3:.0f}"
        print(
            f"{r.policy:14s} {r.rate_scale:6.2f} {r.request_rate:6.2f} {r.attainment:7.1%} {ttft:>20s} "
            f"{tpot:>20s} {r.kv_transfer_gb:8.0f} {r.preemptions:7d} {r.local_prefills:6d} "
            f"{r.prefix_hit_rate:5.0%}"
        )


if __name__ == "__main__":
    raise SystemExit(simulate_main())
