"""The cluster simulator on small synthetic traces: determinism, conservation, policy effects."""

from __future__ import annotations

import json
import math
from pathlib import Path

import msgspec
import pytest

from scheduler.placement.config import PluginSpec
from scheduler.placement.latency_model import class_key, decode_x
from scheduler.placement.policies import policies, policy
from simulate.cluster import parse_cluster
from simulate.goodput import find_goodput
from simulate.runner import SimConfig, Simulation, chunk_tokens_for, simulate
from simulate.slo import SloJudge, SloSpec
from simulate.synthetic import synthetic_trace, workload_trace
from simulate.trace import load_trace
from transport.errors import ErrorCode, PdorchError
from transport.messages import Role
from workers.engines.sim.cost import CostModel

TRACE = synthetic_trace(300, rate_per_s=6.0, seed=11)
CLUSTER = parse_cluster(["2:h100"], ["2:a100"])


def _books_nothing(sim: Simulation, worker_id: str) -> bool:
    node = sim.ledger.node(worker_id)
    return node is not None and not (node.held or node.pending or node.members)


def named(name: str):
    return policy(name, tpot_target_s=0.1, kv_link_gbytes_per_s=100.0)


@pytest.mark.parametrize("name", list(policies()))
def test_every_request_finishes_exactly_once(name: str) -> None:
    sim = Simulation(TRACE, CLUSTER, named(name), policy_name=name)
    result = sim.run()
    assert result.finished == result.requests == len(TRACE.requests)
    assert result.failed == 0 and not result.aborted
    done = [r.done for r in sim._reqs if r is not None]
    assert all(math.isfinite(t) for t in done)
    # Every request's first token precedes its finish, and follows its arrival.
    for r, req in zip(sim.trace.requests, sim._reqs, strict=True):
        assert req is not None and r.arrival_s <= req.first <= req.done
    # Nothing left behind: every engine drained, every reservation released.
    assert all(n.engine.idle and _books_nothing(sim, n.worker_id) for n in sim.nodes)


def test_results_are_deterministic() -> None:
    for name in ("pdorch", "random", "round-robin"):
        a = simulate(TRACE, CLUSTER, named(name), policy_name=name)
        b = simulate(TRACE, CLUSTER, named(name), policy_name=name)
        assert a == b


def test_colocated_moves_no_kv_and_disaggregated_does() -> None:
    coloc = simulate(TRACE, CLUSTER, named("colocated"), policy_name="colocated")
    disagg = simulate(TRACE, CLUSTER, named("round-robin"), policy_name="round-robin")
    assert coloc.kv_transfer_gb == 0.0 and "both" in coloc.cluster
    prompt_bytes = sum(r.prompt_len for r in TRACE.requests if r.output_len > 1) * 320 * 1024
    assert disagg.kv_transfer_gb == pytest.approx(prompt_bytes / 1e9)


def test_prefix_aware_policies_hit_the_cache_more() -> None:
    aware = simulate(TRACE, CLUSTER, named("prefix-queue"), policy_name="prefix-queue")
    blind = simulate(TRACE, CLUSTER, named("random"), policy_name="random")
    assert aware.prefix_hit_rate > blind.prefix_hit_rate > 0.0


def test_kv_reservations_prevent_preemption() -> None:
    trace = synthetic_trace(150, rate_per_s=3.0, prompt_median=6000, output_median=800, seed=1)
    small_decode = parse_cluster(["2:h100"], ["1:l40s"])  # ~100k KV tokens on the decode node
    blind = simulate(trace, small_decode, named("round-robin"))
    assert blind.preemptions > 0
    ours = named("pdorch")
    no_fallback = msgspec.structs.replace(ours, fallback_to_prefill_node=False)
    for config in (ours, no_fallback, named("pdorch-pd")):
        result = simulate(trace, small_decode, config)
        assert result.preemptions == 0
        # Nothing is lost: what is not finished was shed, on purpose, for its TTFT objective.
        assert result.finished + result.shed == len(trace.requests) == result.finished + result.failed


def test_rate_scale_compresses_arrivals() -> None:
    fast = TRACE.scaled(2.0)
    assert fast.duration_s == pytest.approx(TRACE.duration_s / 2)
    r1 = simulate(TRACE, CLUSTER, named("least-request"))
    r2 = simulate(TRACE, CLUSTER, named("least-request"), rate_scale=2.0)
    assert r2.request_rate == pytest.approx(2 * r1.request_rate)
    assert r2.ttft_p90_s >= r1.ttft_p90_s


def test_early_stop_when_the_target_is_out_of_reach() -> None:
    result = simulate(TRACE, CLUSTER, named("random"), rate_scale=50.0, max_misses=10)
    assert result.aborted and result.finished < len(TRACE.requests)


def test_goodput_search_brackets_the_target() -> None:
    slo = SloSpec()
    g = find_goodput(TRACE, CLUSTER, named("least-request"), slo, policy_name="least-request", precision=0.1)
    assert g.goodput_scale > 0 and g.at_goodput is not None
    assert g.at_goodput.attainment >= slo.target
    assert g.goodput_rps == pytest.approx(g.goodput_scale * len(TRACE.requests) / TRACE.duration_s)
    beyond = simulate(TRACE, CLUSTER, named("least-request"), slo, rate_scale=g.goodput_scale * 1.1 * 4)
    assert beyond.attainment < slo.target


def test_slo_judge() -> None:
    ref = CostModel("h100", 4)
    judge = SloJudge(SloSpec(ttft_base_s=1.0, ttft_scale=5.0, tpot_s=0.1), ref)
    assert judge.ttft_limit_s(2048) == pytest.approx(1.0 + 5 * ref.prefill_ms(0, 2048) / 1e3)
    assert judge.met(2048, 1.5, 0.05)
    assert not judge.met(2048, judge.ttft_limit_s(2048) + 0.01, 0.05)
    assert not judge.met(2048, 0.1, 0.11)


def test_chunk_size_follows_the_tpot_slo() -> None:
    h100, a100 = CostModel("h100", 4), CostModel("a100", 4)
    assert chunk_tokens_for(h100, 0.1) > chunk_tokens_for(a100, 0.1) >= 128
    assert chunk_tokens_for(h100, 0.2) > chunk_tokens_for(h100, 0.1)
    c = chunk_tokens_for(h100, 0.1)
    assert h100.prefill_ms(0, c) <= 60.0 < h100.prefill_ms(0, c + 1)


@pytest.mark.parametrize(
    ("prefill", "decode", "fragment"),
    [
        (["8"], [], "bad pool"),
        (["x:h100"], [], "bad pool"),
        (["2:tpu"], [], "unknown accelerator"),
        ([], [], "no instances"),
        ([], ["1:a100@0"], "bad pool"),
        ([], ["1:a100@slow"], "bad pool"),
        ([], ["1:a100@nan"], "bad pool"),
    ],
)
def test_bad_cluster(prefill: list[str], decode: list[str], fragment: str) -> None:
    with pytest.raises(PdorchError) as info:
        parse_cluster(prefill, decode)
    assert info.value.code is ErrorCode.CONFIG and fragment in info.value.message


def test_cluster_description_and_colocation() -> None:
    c = parse_cluster(["2:h100x8"], ["3:a100"])
    assert c.gpus == 2 * 8 + 3 * 4
    assert {i.role for i in c.colocated().instances} == {Role.BOTH}
    assert "2x prefill h100x8" in c.describe() and "(28 GPUs)" in c.describe()


def test_a_degraded_instance_takes_longer_at_everything() -> None:
    c = parse_cluster([], ["1:a100x4", "1:a100x4@2.5"])
    assert [i.slowdown for i in c.instances] == [1.0, 2.5]
    assert "1x decode a100x4 (2.5x slower)" in c.describe()
    healthy, slow = CostModel("a100", 4), CostModel("a100", 4, slowdown=2.5)
    assert slow.prefill_ms(0, 1000) == pytest.approx(2.5 * healthy.prefill_ms(0, 1000))
    assert slow.decode_step_ms(30, 30_000) == pytest.approx(2.5 * healthy.decode_step_ms(30, 30_000))
    assert slow.kv_capacity_tokens == healthy.kv_capacity_tokens


def test_trace_loaders(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:17:04.0319600,3180,8\n"
        "2023-11-16 18:17:03.9799600,4808,10\n"
    )
    t = load_trace(csv)
    assert [r.prompt_len for r in t.requests] == [4808, 3180]  # sorted by time
    assert t.requests[0].arrival_s == 0.0 and t.requests[1].arrival_s == pytest.approx(0.052)
    jsonl = tmp_path / "t.jsonl"
    rows = [
        {"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [0, 1]},
        {"timestamp": 1500, "input_length": 600, "output_length": 9, "hash_ids": [0]},
    ]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    m = load_trace(jsonl)
    assert m.prefix_block_tokens == 512
    assert m.requests[1].arrival_s == 1.5 and m.requests[0].hash_ids == (1, 2)
    assert m.head(1).requests == m.requests[:1]
    sharegpt = tmp_path / "sharegpt.csv"
    sharegpt.write_text(
        "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n"
        + "".join(f"{100 + i},{10 + i},{110 + 2 * i},0.5\n" for i in range(500))
    )
    g = load_trace(sharegpt, requests=400, rate_per_s=8.0, seed=1)
    assert g.name == "sharegpt" and len(g.requests) == 400 and g.requests[0].arrival_s == 0.0
    assert len({(r.prompt_len, r.output_len) for r in g.requests}) == 400  # drawn without replacement
    assert all(r.output_len == r.prompt_len - 90 for r in g.requests)  # rows stay whole
    assert 400 / g.duration_s == pytest.approx(8.0, rel=0.15)  # Poisson arrivals at the rate asked
    assert load_trace(sharegpt, requests=400, rate_per_s=8.0, seed=1) == g  # seeded
    with pytest.raises(PdorchError):
        load_trace(tmp_path / "missing.csv")
    with pytest.raises(PdorchError):
        TRACE.scaled(0.0)


def test_unknown_model_shape_is_a_config_error() -> None:
    with pytest.raises(PdorchError) as info:
        Simulation(TRACE, CLUSTER, named("pdorch"), config=SimConfig(model="gpt-5"))
    assert info.value.code is ErrorCode.CONFIG


def test_decider_config_reaches_the_simulated_cluster() -> None:
    base = named("pdorch-pd")
    # Threshold above every prompt: each request is prefilled on its decode node, nothing moves.
    local = msgspec.structs.replace(base, decider=PluginSpec("threshold", params={"threshold_tokens": 10**6}))
    result = simulate(TRACE, CLUSTER, local)
    assert result.kv_transfer_gb == 0.0 and result.local_prefills == len(TRACE.requests)
    # "never" (colocated serving) turns every node into a "both" node.
    never = msgspec.structs.replace(base, decider=PluginSpec("never"))
    result = simulate(TRACE, CLUSTER, never)
    assert result.kv_transfer_gb == 0.0 and result.local_prefills == 0 and "decode" not in result.cluster


def test_the_decode_model_is_learnt_while_requests_decode_not_only_when_they_end() -> None:
    """A burst of long answers: by the time the first request finishes, the decode step time has
    been learnt from what the nodes decoded meanwhile (before, nothing was known until then and
    placement filled the decode nodes as if a step cost nothing)."""
    trace = synthetic_trace(200, rate_per_s=20.0, seed=5, prompt_median=300, output_median=600)
    sim = Simulation(trace, CLUSTER, named("pdorch"), policy_name="pdorch")
    planner = sim.planner
    seen: list[float] = []
    finished = planner.finished

    decode = next(n for n in sim.nodes if n.hello.role is Role.DECODE)
    key = class_key(decode.hello.model, decode.hello.accelerator)

    def first_finish(job_id: str, now: float, decoded: int) -> None:
        if not seen:
            seen.append(planner.latency.table(now).classes[key].decode.predict(decode_x(50, 50 * 1000)))
        finished(job_id, now, decoded)

    planner.finished = first_finish  # type: ignore[method-assign]
    sim.run()
    want = decode.engine.cost.decode_step_ms(50, 50 * 1000) / 1e3
    assert seen and seen[0] == pytest.approx(want, rel=0.5)


def test_a_prefill_node_that_decodes_while_it_prefills_learns_its_step_and_the_stall() -> None:
    """One prefill and one decode instance under a stream of long answers: the prefill node decodes
    requests lent to it while it prefills every split one. Its decode model must see the step time
    and a prefill's stall apart (when a prefill's own duration was the stall feature, that duration,
    which includes the decode step of its iterations, took nearly all of the step: 35 ms predicted
    here for a 62 ms step)."""
    cluster = parse_cluster(["1:h100x4"], ["1:a100x4"])
    trace = synthetic_trace(600, rate_per_s=20.0, seed=5, prompt_median=300, output_median=600)
    sim = Simulation(trace, cluster, policy("pdorch"), policy_name="pdorch")
    result = sim.run()
    prefill = next(n for n in sim.nodes if n.hello.role is Role.PREFILL)
    assert prefill.engine.generated_at(result.makespan_s) > 10_000  # it did decode, and a lot
    decode = sim.planner.latency.table(math.inf).classes[class_key(prefill.hello.model, "h100")].decode
    cost = prefill.engine.cost
    want = cost.decode_step_ms(100, 100_000) / 1e3
    assert decode.predict(decode_x(100, 100_000)) == pytest.approx(want, rel=0.25)
    # Seconds per 1k prompt tokens against the engine's prefill cost per token (ms).
    assert decode.coef[3] == pytest.approx(cost.b, rel=0.5)


def test_simulated_prefill_nodes_take_handoffs_as_live_agents_do() -> None:
    """A burst of long answers on one decode node: some requests are prefilled on one prefill node
    and decoded on the other (every simulated worker advertises a KV endpoint, as a live agent of
    an engine that moves its own KV does), and all of them finish."""
    trace = workload_trace("synthetic-decode-heavy", 600, seed=1)
    cluster = parse_cluster(["2:h100x4"], ["1:a100x4"])
    sim = Simulation(trace.scaled(6.0), cluster, named("pdorch"), policy_name="pdorch")
    result = sim.run()
    assert result.finished == len(trace.requests)
    roles = [spec.role for spec in cluster.instances]
    handed = [
        r for r in sim._reqs if r is not None and r.prefill != r.decode and roles[r.decode] == Role.PREFILL
    ]
    assert handed and all(roles[r.prefill] == Role.PREFILL for r in handed)
