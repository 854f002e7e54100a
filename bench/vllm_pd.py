"""Real vLLM on this machine: disaggregated (pdorch connector) vs colocated, and the connector's
KV data path vs the raw KV plane.

Part 1 starts a prefill and a decode vLLM (one core each, the tiny test model unless --model-dir)
and sends the same mix of prompts, one request at a time, colocated (the prefill server alone) and
disaggregated (prefill -> p2p KV -> decode). It prints per-request TTFT and end-to-end latency.
Prompts are fresh random tokens per request, so no run profits from another's prefix cache.

Part 2 (no vLLM needed) moves one request's KV of a mid-sized model shape between two paged caches:
through the connector's worker sides (KV plane thread, layer-by-layer hand-off from the "forward
pass" thread, scatter into blocks) and through the raw KV plane (sender -> receiver, a plain sink).

    .venv/bin/python bench/vllm_pd.py                 # both parts
    .venv/bin/python bench/vllm_pd.py --skip-vllm     # part 2 only
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transport.messages import (
    DecodeJob,
    FromWorker,
    GenerateJob,
    KvLoaded,
    KvMode,
    KvRoute,
    PrefillJob,
    Role,
    SamplingParams,
    TokenOutput,
)
from transport.security import Security, SecurityConfig

# ----------------------------------------------------------------------------- part 1: vLLM


class Clock:
    """Records when each request's first token, KV hand-off and finish were reported."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.loaded: dict[str, float] = {}
        self.done: dict[str, float] = {}

    def __call__(self, msg: FromWorker) -> None:
        now = time.perf_counter()
        if isinstance(msg, TokenOutput):
            if msg.token_ids:
                self.first.setdefault(msg.request_id, now)
            if msg.finish_reason is not None:
                self.done[msg.request_id] = now
        elif isinstance(msg, KvLoaded):
            self.loaded[msg.request_id] = now


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000


async def _run_vllm(args: argparse.Namespace) -> None:
    from pdorch.launcher import free_port
    from tests.vllm_support.environment import REPO_ROOT, build_tiny_model
    from tests.vllm_support.processes import VllmServer, wait_healthy
    from workers.engines.vllm.engine import VllmEngine
    from workers.engines.vllm.launch import VllmLaunchSpec

    python = REPO_ROOT / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        print("part 1 skipped: no .venv-vllm (run scripts/install_vllm.sh)")
        return
    work = Path(tempfile.mkdtemp(prefix="pdorch-vllm-bench-"))
    model_dir = Path(args.model_dir) if args.model_dir else build_tiny_model(python, work)
    kv = f"tcp://127.0.0.1:{free_port()}"
    common = {"model_dir": str(model_dir)}
    p_spec = VllmLaunchSpec(port=free_port(), role=Role.PREFILL, cpu_cores="0", **common)
    d_spec = VllmLaunchSpec(port=free_port(), role=Role.DECODE, cpu_cores="1", kv_bind=kv, **common)
    # The KV plane without authentication: what is measured is the transport (docs/benchmarks.md
    # has what CURVE adds).
    insecure = {"PDORCH_INSECURE": "1"}
    prefill = VllmServer("prefill", p_spec, python=python, log_dir=work, env=insecure)
    decode = VllmServer("decode", d_spec, python=python, log_dir=work, env=insecure)
    try:
        wait_healthy([prefill, decode], timeout_s=600)
        p_clock, d_clock = Clock(), Clock()
        p_eng = VllmEngine(prefill.url, model_dir=str(model_dir))
        d_eng = VllmEngine(decode.url, model_dir=str(model_dir), kv_endpoint=kv)
        await p_eng.start(p_clock)
        await d_eng.start(d_clock)
        vocab = 600
        rng = np.random.default_rng(0)
        s = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
        rows = []
        for n in args.prompt_tokens:
            colo_ttft, colo_e2e, dis_ttft, dis_e2e, p_answer = [], [], [], [], []
            for i in range(args.requests + 1):  # the first round warms up and is not counted
                prompt = [int(t) for t in rng.integers(10, vocab, n)]
                rid = f"c{n}-{i}"
                t0 = time.perf_counter()
                await p_eng.generate(GenerateJob(rid, prompt, s))
                c = (p_clock.first[rid] - t0, p_clock.done[rid] - t0)
                prompt = [int(t) for t in rng.integers(10, vocab, n)]
                rid = f"d{n}-{i}"
                route = KvRoute(KvMode.P2P, kv, rid)
                t0 = time.perf_counter()
                dec = asyncio.create_task(d_eng.decode(DecodeJob(rid, prompt, s, route)))
                await p_eng.prefill(PrefillJob(rid, prompt, s, route))
                await dec
                # pdorch streams token 0 from whichever comes first: the prefill's answer or the
                # decode's KvLoaded (which repeats it).
                d = (
                    min(p_clock.first[rid], d_clock.loaded[rid]) - t0,
                    d_clock.done[rid] - t0,
                    p_clock.first[rid] - t0,
                )
                if i:
                    colo_ttft.append(c[0])
                    colo_e2e.append(c[1])
                    dis_ttft.append(d[0])
                    dis_e2e.append(d[1])
                    p_answer.append(d[2])
            rows.append((n, colo_ttft, dis_ttft, colo_e2e, dis_e2e, p_answer))
        await p_eng.close()
        await d_eng.close()
    finally:
        prefill.stop()
        decode.stop()
    print(f"\nvLLM, {args.requests} requests per size, {args.max_tokens} output tokens, one at a time")
    print("median ms; ratio = disaggregated / colocated")
    head = ("prompt", "TTFT colo", "TTFT P/D", "ratio", "E2E colo", "E2E P/D", "ratio", "prefill answer")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (7, 10, 9, 6, 9, 8, 6, 15), strict=True)))
    for n, ct, dt, ce, de, ho in rows:
        ctm, dtm, cem, dem = (statistics.median(v) * 1000 for v in (ct, dt, ce, de))
        print(f"{n:>7} {ctm:>10.1f} {dtm:>9.1f} {dtm / ctm:>6.2f} {cem:>9.1f} {dem:>8.1f} {dem / cem:>6.2f} "
              f"{statistics.median(ho) * 1000:>15.1f}")  # fmt: skip


# ----------------------------------------------------------------------------- part 2: data path


def _bench_connector(layers: int, blocks: int, row: tuple[int, ...], rounds: int) -> float:
    from workers.engines.vllm.connector_metadata import RecvSpec, SendSpec, StepPlan
    from workers.engines.vllm.connector_worker import PdorchWorkerSide
    from workers.engines.vllm.transfer_params import RECV, SEND, PdorchKvParams

    rng = np.random.default_rng(0)
    src = {f"l{i}": rng.standard_normal((blocks * 2, *row)).astype(np.float32) for i in range(layers)}
    dst = {f"l{i}": np.zeros((blocks * 2, *row), np.float32) for i in range(layers)}
    insecure = SecurityConfig(insecure=True)  # the data path alone (kv_handoff.py measures authentication)
    producer = PdorchWorkerSide(bind=None, security=insecure)
    consumer = PdorchWorkerSide(bind="tcp://127.0.0.1:0", security=insecure)
    producer.register_kv_caches(src)
    consumer.register_kv_caches(dst)
    ids = list(range(blocks))
    best = float("inf")
    try:
        for r in range(rounds):
            tid = f"bench-{r}"
            t0 = time.perf_counter()
            consumer.start_load_kv(
                StepPlan(recvs=[RecvSpec(f"d{r}", PdorchKvParams(RECV, tid, "p2p", "", 60), ids, 0, blocks)])
            )
            plan = StepPlan(
                sends=[
                    SendSpec(
                        f"p{r}", PdorchKvParams(SEND, tid, "p2p", consumer.kv.endpoint, 60), ids, blocks, 60
                    )
                ]
            )
            for name in src:
                producer.save_kv_layer(plan, name)
            producer.wait_for_save(plan)
            while not consumer.get_transfer_results(set())[1]:
                time.sleep(0.0005)
            best = min(best, time.perf_counter() - t0)
            while not producer.get_transfer_results({f"p{r}"})[0]:
                time.sleep(0.0005)
        np.testing.assert_array_equal(dst["l0"][:blocks], src["l0"][:blocks])
    finally:
        producer.shutdown()
        consumer.shutdown()
    return best


def _bench_raw(layers: int, blocks: int, row: tuple[int, ...], rounds: int) -> float:
    """Sender and receiver each on their own thread and event loop, as in the connector's case."""
    import threading

    import zmq.asyncio

    from transport.kv import KvReceiver, KvSender

    class Sink:
        def __init__(self) -> None:
            self.out = [np.zeros((blocks, *row), np.float32) for _ in range(layers)]

        def write(self, layer: int, row_offset: int, rows: np.ndarray) -> None:
            self.out[layer][row_offset : row_offset + rows.shape[0]] = rows

    rng = np.random.default_rng(0)
    src = [rng.standard_normal((blocks, *row)).astype(np.float32) for _ in range(layers)]
    ctx = zmq.asyncio.Context()
    rx_loop = asyncio.new_event_loop()
    rx_thread = threading.Thread(target=rx_loop.run_forever, daemon=True)
    rx_thread.start()

    async def make_receiver() -> KvReceiver:
        receiver = KvReceiver(ctx, security=Security.insecure(), bind="tcp://127.0.0.1:0")
        await receiver.start()
        return receiver

    receiver = asyncio.run_coroutine_threadsafe(make_receiver(), rx_loop).result()

    async def run() -> float:
        sender = KvSender(ctx, security=Security.insecure())
        best = float("inf")
        sink = Sink()  # reused, like the engine's cache: no first-touch page faults after round one
        try:
            for r in range(rounds):
                tid = f"raw-{r}"
                t0 = time.perf_counter()
                got = asyncio.run_coroutine_threadsafe(
                    receiver.receive(KvRoute(KvMode.P2P, "", tid), sink, deadline_s=60), rx_loop
                )
                stream = await sender.open(
                    KvRoute(KvMode.P2P, receiver.endpoint, tid),
                    num_layers=layers,
                    rows_per_layer=blocks,
                    row_shape=row,
                    dtype="float32",
                    deadline_s=60,
                )
                for i, arr in enumerate(src):
                    await stream.send_layer(i, arr)
                await stream.finish({"num_tokens": blocks})
                await asyncio.wrap_future(got)
                best = min(best, time.perf_counter() - t0)
            np.testing.assert_array_equal(sink.out[0], src[0])
        finally:
            await sender.close()
        return best

    try:
        return asyncio.run(run())
    finally:
        asyncio.run_coroutine_threadsafe(receiver.close(), rx_loop).result()
        rx_loop.call_soon_threadsafe(rx_loop.stop)
        rx_thread.join(timeout=5)
        ctx.destroy(linger=0)


def _run_data_path(args: argparse.Namespace) -> None:
    # A Llama-8B-like layer: 8 KV heads x 32-token blocks x (K+V) 2x128 dims, fp32 here.
    layers, row = 32, (8, 32, 256)
    blocks = args.kv_blocks
    nbytes = layers * blocks * int(np.prod(row)) * 4
    raw = _bench_raw(layers, blocks, row, args.rounds)
    conn = _bench_connector(layers, blocks, row, args.rounds)
    shape = f"{layers} layers x {blocks} blocks of {row} fp32"
    print(f"\nKV hand-off of one request: {shape} = {nbytes / 1e6:.1f} MB (best of {args.rounds})")
    for label, t in (("raw KV plane (sender -> receiver)", raw), ("pdorch connector (worker sides)", conn)):
        print(f"  {label:<36} {t * 1000:8.1f} ms  {nbytes / t / 1e9:6.2f} GB/s")
    print(f"  connector / raw time: {conn / raw:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default="", help="model to serve (default: build the tiny test model)")
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[32, 128, 448])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=30, help="measured requests per prompt size")
    p.add_argument("--kv-blocks", type=int, default=16, help="blocks per request in part 2")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--skip-vllm", action="store_true")
    args = p.parse_args()
    if not args.skip_vllm:
        asyncio.run(_run_vllm(args))
    _run_data_path(args)


if __name__ == "__main__":
    main()
