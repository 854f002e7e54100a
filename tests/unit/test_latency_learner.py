"""The latency models learn known cost functions from observations, per node class."""

from __future__ import annotations

import random

import pytest

from scheduler.placement.config import default_accelerators
from scheduler.placement.latency_model import (
    MAX_PREFILL_SHARE,
    class_key,
    decode_x,
    prefill_x,
    stall_s,
    step_s,
)
from scheduler.prediction.latency import (
    TPOT_MARGIN_MAX,
    TPOT_MARGIN_STEP,
    TPOT_MISS_TARGET,
    DecodeSample,
    LatencyLearner,
    PrefillSample,
    TpotOutcome,
)
from scheduler.prediction.online_regression import FOLD_AT, OnlineRegression
from workers.engines.sim.cost import CostModel

MODEL = "llama-2-70b"


def test_online_regression_recovers_a_linear_function() -> None:
    rng = random.Random(1)
    reg = OnlineRegression((0.0, 0.0, 0.0), decay=1.0)
    for _ in range(500):
        x = (1.0, rng.uniform(0, 5), rng.uniform(0, 2))
        reg.observe(x, 0.3 + 0.7 * x[1] + 0.2 * x[2] + rng.gauss(0, 0.01))
    assert reg.coef() == pytest.approx((0.3, 0.7, 0.2), abs=0.01)


def test_online_regression_keeps_coefficients_non_negative_and_unseen_features_at_their_prior() -> None:
    rng = random.Random(2)
    reg = OnlineRegression((0.5, 0.0, 0.25))
    for _ in range(300):
        u = rng.uniform(0, 4)
        # The third feature never varies from 0: its coefficient stays at the prior. The data pull
        # the constant below zero; it is pinned at zero and the slope refitted through the origin.
        reg.observe((1.0, u, 0.0), 1.2 * u - 0.3)
    coef = reg.coef()
    assert coef[0] == 0.0 and coef[2] == pytest.approx(0.25)
    assert 1.0 < coef[1] < 1.2


def test_observations_folded_in_batches_fit_as_if_folded_one_by_one() -> None:
    """Observing queues; reading the coefficients (or a full queue) folds the queue in one matrix
    product. Read after every observation or only now and then, the fit is the same."""
    rng = random.Random(4)
    one_by_one, batched = (OnlineRegression((0.1, 0.2, 0.0), decay=0.995) for _ in range(2))
    for _ in range(3 * FOLD_AT + 17):
        x = (1.0, rng.uniform(0, 5), rng.uniform(0, 2))
        y = 0.3 + 0.7 * x[1] + rng.gauss(0, 0.05)
        one_by_one.observe(x, y)
        batched.observe(x, y)
        one_by_one.coef()
        if rng.random() < 0.01:
            assert batched.coef() == pytest.approx(one_by_one.coef(), rel=1e-9)
    assert batched.coef() == pytest.approx(one_by_one.coef(), rel=1e-9)
    assert batched.weight == pytest.approx(one_by_one.weight)


def test_online_regression_forgets_to_follow_a_change() -> None:
    reg = OnlineRegression((0.0, 0.0), decay=0.99)
    for u in range(400):
        reg.observe((1.0, u % 7), 1.0 * (u % 7))
    for u in range(400):
        reg.observe((1.0, u % 7), 2.0 * (u % 7))  # the node got twice as slow
    assert reg.coef()[1] == pytest.approx(2.0, rel=0.02)


def test_prefill_model_learns_the_cost_model_of_each_class() -> None:
    """Observations timed by the simulator's cost model (Llama-2-70B, tensor parallel 4): a node class
    is predicted within 2% on prompts it has not seen, with and without a cached prefix."""
    learner = LatencyLearner(default_accelerators(), publish_interval_s=0.0)
    rng = random.Random(3)
    costs = {acc: CostModel(acc, 4) for acc in ("h100", "a100")}
    for _ in range(400):
        for acc, cost in costs.items():
            cached = rng.choice((0, 0, 512 * rng.randrange(1, 20)))
            uncached = rng.randrange(100, 30_000)
            seconds = cost.prefill_ms(cached, cached + uncached) / 1e3
            learner.observe_prefill(PrefillSample(MODEL, acc, uncached, cached, 0.0, 0.0, seconds))
    table = learner.table(now=1.0)
    for acc, cost in costs.items():
        model = table.classes[class_key(MODEL, acc)].prefill
        for cached, uncached in ((0, 777), (0, 12_345), (4096, 40_000), (1024, 3000)):
            want = cost.prefill_ms(cached, cached + uncached) / 1e3
            assert model.predict(prefill_x(uncached, cached, 0, 0)) == pytest.approx(want, rel=0.02)
    # The H100 was learnt to be the faster prefill node.
    h100, a100 = (table.classes[class_key(MODEL, a)].prefill for a in ("h100", "a100"))
    assert h100.predict(prefill_x(4000, 0, 0, 0)) < a100.predict(prefill_x(4000, 0, 0, 0))


def test_prefill_model_learns_what_a_decode_batch_costs_a_chunked_prefill() -> None:
    """On a node that decodes, each prefill chunk shares an iteration with the batch: the known cost
    adds the decode step's marginal part once per chunk."""
    cost, chunk = CostModel("a100", 4), 512
    learner = LatencyLearner(default_accelerators(), publish_interval_s=0.0)
    rng = random.Random(4)

    def timed(uncached: int, batch: int, context: int) -> float:
        chunks = -(-uncached // chunk)
        return (cost.prefill_ms(0, uncached) + chunks * cost.decode_marginal_ms(batch, context)) / 1e3

    for _ in range(800):
        u, b = rng.randrange(chunk, 16_000), rng.randrange(0, 120)
        ctx = b * rng.randrange(500, 4000)
        learner.observe_prefill(PrefillSample(MODEL, "a100", u, 0, b, ctx, timed(u, b, ctx)))
    model = learner.table(now=1.0).classes[class_key(MODEL, "a100")].prefill
    for u, b in ((2048, 0), (2048, 80), (9000, 40)):
        ctx = b * 2000
        assert model.predict(prefill_x(u, 0, b, ctx)) == pytest.approx(timed(u, b, ctx), rel=0.05)


def test_prefill_model_learns_that_any_decoding_chunks_the_prompt() -> None:
    """A node with even one request decoding prefills in chunks (Sarathi-Serve, vLLM's chunked
    prefill), paying an iteration's fixed cost once per chunk: a prompt next to a batch of one costs
    nearly what it costs next to a batch of forty, and much more than on an idle node."""
    cost, chunk = CostModel("h100", 4), 512
    learner = LatencyLearner(default_accelerators(), publish_interval_s=0.0)
    rng = random.Random(5)

    def timed(uncached: int, batch: int, context: int) -> float:
        if batch == 0:
            return cost.prefill_ms(0, uncached) / 1e3
        ends = [*range(chunk, uncached, chunk), uncached]
        starts = [0, *ends[:-1]]
        compute = sum(cost.prefill_ms(s, e) for s, e in zip(starts, ends, strict=True))
        return (compute + len(ends) * cost.decode_marginal_ms(batch, context)) / 1e3

    for _ in range(1500):
        u, b = rng.randrange(chunk, 16_000), rng.choice((0, 0, 1, 2, rng.randrange(3, 60)))
        ctx = b * rng.randrange(500, 4000)
        learner.observe_prefill(PrefillSample(MODEL, "h100", u, 0, b, ctx, timed(u, b, ctx)))
    model = learner.table(now=1.0).classes[class_key(MODEL, "h100")].prefill
    for u, b in ((2048, 0), (9000, 0), (2048, 1), (9000, 1), (9000, 40)):
        ctx = b * 2000
        assert model.predict(prefill_x(u, 0, b, ctx)) == pytest.approx(timed(u, b, ctx), rel=0.08), (u, b)


def test_decode_model_learns_the_step_time_and_the_stalls() -> None:
    cost = CostModel("a100", 4)
    learner = LatencyLearner(default_accelerators(), publish_interval_s=0.0)
    rng = random.Random(5)
    per_token_s = cost.b / 1e3  # what a prompt token prefilled meanwhile adds to the batch's time
    for _ in range(600):
        batch = rng.uniform(1, 150)
        context = batch * rng.uniform(500, 3000)
        steps = rng.randrange(2, 800)
        prefilled = rng.choice((0, rng.randrange(0, 20_000)))  # prompt tokens the node prefilled meanwhile
        seconds = steps * cost.decode_step_ms(batch, context) / 1e3 + prefilled * per_token_s
        learner.observe_decode(DecodeSample(MODEL, "a100", steps, batch, context, prefilled, seconds))
    model = learner.table(now=1.0).classes[class_key(MODEL, "a100")].decode
    for batch in (1, 40, 120):
        want = cost.decode_step_ms(batch, batch * 2000) / 1e3
        assert model.predict(decode_x(batch, batch * 2000)) == pytest.approx(want, rel=0.03)
        # A node prefilling 2,000 tokens/s spends that share of its time on them: steps last longer.
        rho = 2000 * per_token_s
        assert step_s(model, batch, batch * 2000, 2000) == pytest.approx(want / (1 - rho), rel=0.03)
    assert stall_s(model, 1000) == pytest.approx(1000 * per_token_s, rel=0.05)
    # Prefills take all of its time: a step still ends with every prefill chunk, long but finite.
    alone = model.predict(decode_x(10, 0))
    assert step_s(model, 10, 0, 2.0 / per_token_s) == pytest.approx(alone / (1 - MAX_PREFILL_SHARE))
    assert step_s(model, 0, 0, 0) == 0.0


def _outcome(met: bool) -> TpotOutcome:
    return TpotOutcome(MODEL, "a100", met)


def test_the_tpot_margin_settles_at_the_miss_target_and_vanishes_while_predictions_hold() -> None:
    learner = LatencyLearner(default_accelerators(), publish_interval_s=0.0)
    key = class_key(MODEL, "a100")
    for _ in range(500):
        learner.observe_tpot(_outcome(True))  # every request meets its objective
    assert key not in learner.table(now=1.0).tpot_margin
    rng = random.Random(3)
    for _ in range(3000):  # a third miss it: the margin grows
        learner.observe_tpot(_outcome(rng.random() >= 1 / 3))
    assert learner.table(now=2.0).tpot_margin[key] == TPOT_MARGIN_MAX
    for _ in range(200):  # the misses stop: it narrows again, to nothing
        learner.observe_tpot(_outcome(True))
    narrowed = learner.table(now=3.0).tpot_margin[key]
    assert 0 < narrowed < TPOT_MARGIN_MAX
    for _ in range(2000):
        learner.observe_tpot(_outcome(True))
    assert key not in learner.table(now=4.0).tpot_margin
    for _ in range(50):
        learner.observe_tpot(_outcome(False))
    assert learner.table(now=5.0).tpot_margin[key] == pytest.approx(
        50 * TPOT_MARGIN_STEP * (1 - TPOT_MISS_TARGET)
    )


def _decode_rounds(
    learner: LatencyLearner, cost: CostModel, slowdowns: dict[str, float], rounds: int, t0: float = 0.0
) -> None:
    """Every node of one A100 class reports a decode observation per round (published between
    rounds, as placement does once a second); ``slowdowns``: each node's time over the class's."""
    rng = random.Random(9)
    for r in range(rounds):
        for worker, slow in slowdowns.items():
            batch = rng.uniform(1, 150)
            context = batch * rng.uniform(500, 3000)
            steps = rng.randrange(50, 400)
            seconds = slow * steps * cost.decode_step_ms(batch, context) / 1e3
            learner.observe_decode(
                DecodeSample(MODEL, "a100", steps, batch, context, 0, seconds, worker_id=worker)
            )
        learner.table(now=t0 + r, nodes=[(w, MODEL, "a100") for w in slowdowns])


def test_a_slow_node_gets_its_own_speed_and_leaves_its_class_model_alone() -> None:
    """One A100 instance of four takes twice as long (a throttled part): placement sees it 2x slower,
    and the class's model (the other three, and any new node) keeps the healthy step time."""
    cost = CostModel("a100", 4)
    learner = LatencyLearner(default_accelerators(), publish_interval_s=0.0)
    nodes = {"a": 1.0, "b": 1.0, "c": 1.0, "slow": 2.0}
    _decode_rounds(learner, cost, nodes, 300)
    factors = learner.speed_factors()
    assert factors["slow"] == pytest.approx((2.0, 2.0), rel=0.05)
    assert all(factors[w] == pytest.approx((1.0, 1.0), rel=0.05) for w in "abc")
    table = learner.table(now=1e9)
    want = cost.decode_step_ms(60, 60 * 2000) / 1e3
    assert table.classes[class_key(MODEL, "a100")].decode.predict(decode_x(60, 60 * 2000)) == pytest.approx(
        want, rel=0.05
    )
    assert table.nodes["slow"].decode.predict(decode_x(60, 60 * 2000)) == pytest.approx(2 * want, rel=0.08)
    assert table.nodes["a"].decode.predict(decode_x(60, 60 * 2000)) == pytest.approx(want, rel=0.08)


def test_a_class_of_equally_slow_nodes_is_a_slow_class_not_slow_nodes() -> None:
    cost = CostModel("a100", 4)
    learner = LatencyLearner(default_accelerators(), publish_interval_s=0.0)
    _decode_rounds(learner, cost, {"a": 1.5, "b": 1.5, "c": 1.5}, 300)
    assert all(f == pytest.approx((1.0, 1.0), rel=0.05) for f in learner.speed_factors().values())
    model = learner.table(now=1e9).classes[class_key(MODEL, "a100")].decode
    want = 1.5 * cost.decode_step_ms(60, 60 * 2000) / 1e3
    assert model.predict(decode_x(60, 60 * 2000)) == pytest.approx(want, rel=0.05)


def test_a_node_that_recovers_is_seen_at_its_class_speed_again_and_a_gone_one_is_forgotten() -> None:
    cost = CostModel("a100", 4)
    learner = LatencyLearner(default_accelerators(), publish_interval_s=0.0)
    _decode_rounds(learner, cost, {"a": 1.0, "b": 1.0, "c": 3.0}, 200)
    assert learner.speed_factors()["c"][1] > 2.5
    _decode_rounds(learner, cost, {"a": 1.0, "b": 1.0, "c": 1.0}, 60, t0=200)  # its window and more
    assert learner.speed_factors()["c"][1] == pytest.approx(1.0, rel=0.1)
    learner.observe_decode(DecodeSample(MODEL, "a100", 10, 5, 5000, 0, 1.0, worker_id="a"))  # something new
    assert "c" not in learner.table(now=1e9, nodes=[("a", MODEL, "a100"), ("b", MODEL, "a100")]).nodes
    assert "c" not in learner.speed_factors()
