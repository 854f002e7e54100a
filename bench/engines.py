"""The reference engine next to vLLM CPU on the same weights (the default model), in one run.

Both compute on one core: the reference engine's core steps in this process with one BLAS thread,
vLLM's compute threads are bound to one core (its API server process runs beside them). Rounds
alternate between the engines, so a burst of load elsewhere hits both alike; each figure is the
best of the rounds.

- prefill tok/s: one prompt of ``--prompt-tokens`` random token ids, until its first token;
- decode tok/s at batch 1: each of ``--batch`` requests alone, from its first token to its last;
- decode tok/s at batch B: the same requests all at once, while all of them are decoding.

For the reference engine it also shows what the default float64 buys, for each ``--dtypes``: how
far a request's logits move when it decodes in a batch instead of alone (``max |dlogit|``: BLAS
rounds a row differently with the batch's shape), and whether its greedy tokens changed
(``same tokens``).

It ends with the matrix products alone (the bulk of the reference engine's work) computed three
ways, which is why the reference engine computes in float64 (``products``): float64 as one
product per batch, float32 as one product per batch, and float32 one row at a time (numpy then
multiplies each row on its own, so a row's result cannot depend on the batch: exact, but every
row reads all the weights).

    .venv/bin/python bench/engines.py                     # ~10 minutes on 2 cores
    .venv/bin/python bench/engines.py --skip-vllm --dtypes float64 float32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: one core, like `pdorch worker`

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transport.messages import SamplingParams
from workers.engines.reference.checkpoint import load_checkpoint
from workers.engines.reference.core import EngineCore
from workers.engines.reference.kv_cache import BlockAllocator, PagedKvCache
from workers.engines.reference.model import ReferenceModel
from workers.models.catalog import DEFAULT_MODEL
from workers.models.local_model import model_dir

# Per request: the time of each token's arrival.
Timeline = list[float]


def decode_rate(timelines: Sequence[Timeline]) -> float:
    """Tokens per second while every request was decoding: from the last first token to the first
    last token (one request: from its first token to its last)."""
    start = max(t[0] for t in timelines)
    end = min(t[-1] for t in timelines)
    tokens = sum(1 for t in timelines for stamp in t if start < stamp <= end)
    return tokens / (end - start)


def prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    # Ordinary tokens only (the first ids of the default model's vocabulary are control tokens).
    return [rng.integers(100, vocab, length).tolist() for _ in range(count)]


# ----------------------------------------------------------------------------- reference engine


def logit_spread(model: ReferenceModel, requests: list[list[int]], steps: int) -> float:
    """The largest difference between a request's next-token logits computed alone and in one
    batched step with all the others (same KV, same position), over ``steps`` decode steps."""
    cfg = model.cfg
    cache = PagedKvCache(cfg, 1024, 16)
    allocator = BlockAllocator(1024)
    running = []
    for prompt in requests:
        blocks = allocator.allocate(cache.blocks_for(len(prompt) + steps + 1))
        running.append((prompt, blocks, [int(np.argmax(model.prefill(prompt, cache, blocks)))]))
    spread = 0.0
    for _ in range(steps):
        batch = [(out[-1], len(prompt) + len(out) - 1, blocks) for prompt, blocks, out in running]
        alone = [model.decode_step([entry], cache)[0] for entry in batch]
        together = model.decode_step(batch, cache)
        spread = max(spread, max(float(np.abs(a - b).max()) for a, b in zip(alone, together, strict=True)))
        for (_, _, out), row in zip(running, together, strict=True):
            out.append(int(np.argmax(row)))
    return spread


class Reference:
    def __init__(self, directory: Path, dtype: str, batch: int) -> None:
        cfg, weights = load_checkpoint(directory, dtype=dtype, max_model_len=4096)
        self.vocab = cfg.vocab_size
        self.model = ReferenceModel(cfg, weights)
        # No prefix caching: every round's prompts are fresh anyway, and cached blocks must not
        # make a prefill look faster than it computes.
        self.core = EngineCore(
            cfg,
            512,
            16,
            max_batch=batch,
            max_prefill_tokens_per_step=512,
            enable_prefix_caching=False,
            weights=weights,
        )
        self._ids = 0

    def _run(self, requests: list[list[int]], max_tokens: int) -> tuple[list[Timeline], list[list[int]]]:
        sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        names = []
        for prompt in requests:
            self._ids += 1
            names.append(f"r{self._ids}")
            self.core.add_generate(names[-1], prompt, sampling)
        stamps: dict[str, Timeline] = {n: [] for n in names}
        tokens: dict[str, list[int]] = {n: [] for n in names}
        done = 0
        while done < len(names):
            outputs = self.core.step()
            now = time.perf_counter()
            for out in outputs:
                stamps[out.request_id].append(now)
                tokens[out.request_id].append(out.token_id)
                done += out.finish_reason is not None
        return [stamps[n] for n in names], [tokens[n] for n in names]

    def prefill(self, prompt: list[int]) -> float:
        t0 = time.perf_counter()
        self._run([prompt], 1)
        return len(prompt) / (time.perf_counter() - t0)

    def decode(self, requests: list[list[int]], max_tokens: int) -> tuple[float, float, int]:
        """(batch-1 tok/s, batch tok/s, requests whose greedy tokens are the same batched and alone)."""
        alone = [self._run([p], max_tokens) for p in requests]
        batched_times, batched_tokens = self._run(requests, max_tokens)
        rate_1 = float(np.median([decode_rate(times) for times, _ in alone]))
        same = sum(a[1][0] == b for a, b in zip(alone, batched_tokens, strict=True))
        return rate_1, decode_rate(batched_times), same


# ----------------------------------------------------------------------------------------- vLLM


class Vllm:
    """A vLLM server on one core, float32, serving the same converted directory."""

    def __init__(self, directory: Path, batch: int, log_dir: Path) -> None:
        from pdorch.launcher import free_port
        from tests.vllm_support.environment import vllm_python
        from tests.vllm_support.processes import VllmServer, wait_healthy
        from workers.engines.vllm.launch import VllmLaunchSpec

        spec = VllmLaunchSpec(
            model_dir=str(directory),
            port=free_port(),
            role=None,
            cpu_cores="0",
            max_num_seqs=batch,
            max_model_len=4096,
            served_model_name="m",
            extra_args=["--no-enable-prefix-caching"],
        )
        self.server = VllmServer("bench", spec, python=vllm_python(), log_dir=log_dir)
        wait_healthy([self.server], timeout_s=600)

    async def _one(self, session, prompt: list[int], max_tokens: int) -> Timeline:  # type: ignore[no-untyped-def]
        body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        body |= {"ignore_eos": True, "stream": True, "return_token_ids": True}
        stamps: Timeline = []
        async with session.post(self.server.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                for choice in json.loads(line[6:]).get("choices", []):
                    stamps += [now] * len(choice.get("token_ids") or [])
        return stamps

    async def _many(self, requests: list[list[int]], max_tokens: int) -> list[Timeline]:
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
            return list(await asyncio.gather(*(self._one(session, p, max_tokens) for p in requests)))

    def prefill(self, prompt: list[int]) -> float:
        t0 = time.perf_counter()
        asyncio.run(self._many([prompt], 1))
        return len(prompt) / (time.perf_counter() - t0)

    def decode(self, requests: list[list[int]], max_tokens: int) -> tuple[float, float]:
        alone = [decode_rate(asyncio.run(self._many([p], max_tokens))) for p in requests]
        return float(np.median(alone)), decode_rate(asyncio.run(self._many(requests, max_tokens)))

    def stop(self) -> None:
        self.server.stop()


# ------------------------------------------------------------------------------------ products


def product_rates(directory: Path, rows: Sequence[int], repeats: int = 3) -> dict[str, dict[int, float]]:
    """Rows per second through every matrix product of the model (the output head for at most one
    row per sequence), per way of computing them, for batches of ``rows``."""
    cfg, weights32 = load_checkpoint(directory, dtype="float32")
    ways = {
        "float64 batched": ([w.astype(np.float64) for w in _matrices(weights32)], False),
        "float32 batched": (_matrices(weights32), False),
        "float32 row by row": (_matrices(weights32), True),
    }
    rng = np.random.default_rng(0)
    rates: dict[str, dict[int, float]] = {}
    for name, (matrices, by_row) in ways.items():
        rates[name] = {}
        for n in rows:
            inputs = {m.shape[0]: rng.standard_normal((n, m.shape[0])).astype(m.dtype) for m in matrices}
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                for m in matrices:
                    x = inputs[m.shape[0]]
                    if m.shape[1] == cfg.vocab_size and n > 16:
                        x = x[-1:]  # a prompt's logits: its last row only
                    # [n, 1, k] @ [k, m]: numpy multiplies row by row (one matrix-vector product each).
                    _ = x[:, None, :] @ m if by_row else x @ m
                best = min(best, time.perf_counter() - t0)
            rates[name][n] = n / best
    return rates


def _matrices(weights) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    out = []
    for layer in weights.layers:
        out += [layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down]
    return [*out, weights.unembed]


# ---------------------------------------------------------------------------------------- main


def best(rows: list[dict[str, float]], key: str, pick: Callable[[Sequence[float]], float] = max) -> float:
    return pick([r[key] for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="a known model, a .gguf file or a directory")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=512, help="prefill prompt length")
    p.add_argument("--decode-prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=48, help="output tokens per decode request")
    p.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=["float64", "float32"])
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--skip-products", action="store_true")
    args = p.parse_args()

    directory = model_dir(args.model)
    engines: dict[str, Reference | Vllm] = {
        f"reference {d}": Reference(directory, d, args.batch) for d in args.dtypes
    }
    vocab = next(iter(engines.values())).vocab if engines else 49152  # type: ignore[union-attr]
    vllm = None
    if not args.skip_vllm:
        vllm = Vllm(directory, args.batch, Path(tempfile.mkdtemp(prefix="pdorch-bench-engines-")))
        engines["vLLM float32"] = vllm
    results: dict[str, list[dict[str, float]]] = {name: [] for name in engines}
    try:
        for r in range(args.rounds):
            long_prompt = prompts(1, args.prompt_tokens, vocab, seed=1000 + r)[0]
            requests = prompts(args.batch, args.decode_prompt_tokens, vocab, seed=r)
            for name, engine in engines.items():
                row = {"prefill": engine.prefill(long_prompt)}
                decoded = engine.decode(requests, args.max_tokens)
                row["decode_1"], row[f"decode_{args.batch}"] = decoded[0], decoded[1]
                if isinstance(engine, Reference):
                    row["same"] = decoded[2]  # type: ignore[misc]
                    row["spread"] = logit_spread(engine.model, requests, 8)
                results[name].append(row)
                print(
                    f"round {r + 1} {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()), flush=True
                )
    finally:
        if vllm is not None:
            vllm.stop()

    b = args.batch
    print(f"\n{args.model}, one core each, best of {args.rounds} rounds (tok/s; ratio to vLLM)")
    head = ("engine", "prefill", "decode b=1", f"decode b={b}", "max |dlogit|", "same tokens")
    print(f"{head[0]:<18} {head[1]:>14} {head[2]:>14} {head[3]:>14} {head[4]:>13} {head[5]:>12}")
    base = results.get("vLLM float32")
    keys = ("prefill", "decode_1", f"decode_{b}")
    for name, rows in results.items():
        cells = [best(rows, key) for key in keys]
        text = [f"{c:.1f}" for c in cells]
        if base is not None and name != "vLLM float32":
            text = [f"{c:.1f} ({c / best(base, k):.2f}x)" for c, k in zip(cells, keys, strict=True)]
        spread = f"{best(rows, 'spread'):.1e}" if "spread" in rows[0] else ""
        same = f"{int(sum(x['same'] for x in rows))}/{b * len(rows)}" if "same" in rows[0] else ""
        print(f"{name:<18} {text[0]:>14} {text[1]:>14} {text[2]:>14} {spread:>13} {same:>12}")
    if args.skip_products:
        return
    sizes = (1, b, args.prompt_tokens)
    rates = product_rates(directory, sizes)
    print(f"\nmatrix products only, rows/s (a batch of {b} decoding, a {args.prompt_tokens}-token prompt)")
    print(f"{'computed as':<20} " + " ".join(f"{f'{n} rows':>10}" for n in sizes))
    for name, per_size in rates.items():
        print(f"{name:<20} " + " ".join(f"{per_size[n]:>10.1f}" for n in sizes))


if __name__ == "__main__":
    main()
